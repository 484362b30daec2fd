"""Each preference loss against its closed form, on log-probabilities chosen so the numbers can be followed by hand."""

import math

import pytest
import torch

from xtune.engine.preference import (
    DPO_LOSS_TYPES,
    RunningMean,
    bradley_terry_loss,
    dpo_losses,
    kto_losses,
    orpo_odds_ratio,
    preference_metrics,
    simpo_losses,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# pi_c = -1, pi_r = -3, ref_c = ref_r = -2: the chosen log-ratio c = 1, the rejected r = -1, h = c - r = 2
PAIR = [torch.tensor([value]) for value in (-1.0, -3.0, -2.0, -2.0)]
BETA, EPS = 0.1, 0.2

CLOSED_FORMS = {
    "sigmoid": -(1 - EPS) * log_sigmoid(0.2) - EPS * log_sigmoid(-0.2),
    "robust": (-(1 - EPS) * log_sigmoid(0.2) + EPS * log_sigmoid(-0.2)) / (1 - 2 * EPS),
    "hinge": 1 - 0.2,
    "ipo": (2 - 1 / 0.2) ** 2,  # 9
    # one pair: the chosen KL estimate is c = 1, the rejected one max(r, 0) = 0
    "kto_pair": ((1 - sigmoid(0.1 * (1 - 0))) + (1 - sigmoid(0.1 * (1 - -1)))) / 2,
    "bco_pair": -log_sigmoid(0.1 * 1 - 0.05) - log_sigmoid(-(0.1 * -1 - 0.05)),  # delta 0.05
    "sppo_hard": (1 - 5) ** 2 + (-1 + 5) ** 2,  # 32
    "nca_pair": -log_sigmoid(0.1) - 0.5 * log_sigmoid(-0.1) - 0.5 * log_sigmoid(0.1),
}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_each_dpo_loss_type_is_its_closed_form(loss_type):
    loss = dpo_losses(*PAIR, beta=BETA, loss_type=loss_type, label_smoothing=EPS, delta=0.05)
    assert loss.item() == pytest.approx(CLOSED_FORMS[loss_type], rel=1e-6)


def test_every_loss_type_has_a_closed_form_and_unknown_ones_are_refused():
    assert set(CLOSED_FORMS) == set(DPO_LOSS_TYPES)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'exo'; known: sigmoid, hinge"):
        dpo_losses(*PAIR, loss_type="exo")


def test_plain_dpo_pushes_the_chosen_answer_up_and_the_rejected_down():
    policy_chosen, policy_rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    dpo_losses(policy_chosen, policy_rejected, PAIR[2], PAIR[3], beta=BETA).sum().backward()
    grad = BETA * (1 - sigmoid(0.2))  # d/dh of -log s(beta h), times -1
    assert policy_chosen.grad.item() == pytest.approx(-grad) and policy_rejected.grad.item() == pytest.approx(grad)


def test_simpo_orpo_kto_and_bradley_terry_are_their_closed_forms():
    mean_chosen, mean_rejected = torch.tensor([-0.5]), torch.tensor([-1.5])
    assert simpo_losses(mean_chosen, mean_rejected, beta=2.0, gamma=1.0).item() == pytest.approx(-log_sigmoid(1.0))
    odds = lambda logp: math.log(math.exp(logp) / (1 - math.exp(logp)))  # noqa: E731
    expected = log_sigmoid(odds(-0.5) - odds(-1.5))
    assert orpo_odds_ratio(mean_chosen, mean_rejected).item() == pytest.approx(expected, rel=1e-6)
    policy, reference = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0])  # both log-ratios 1, KL estimate 0.5
    losses = kto_losses(policy, reference, torch.tensor([True, False]), torch.tensor(0.5), beta=0.1,
                        desirable_weight=1.0, undesirable_weight=1.5)  # fmt: skip
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.05), 1.5 * (1 - sigmoid(-0.05))])
    negative_kl = kto_losses(policy, reference, torch.tensor([True, True]), torch.tensor(-3.0))
    assert negative_kl.tolist() == pytest.approx([1 - sigmoid(0.1)] * 2)  # the estimate is clamped at 0
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(-log_sigmoid(1.5))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0])).item() == pytest.approx(
        -log_sigmoid(0.5)
    )


def test_metrics_are_trls_implicit_rewards():
    metrics = preference_metrics(*PAIR, beta=BETA)
    assert {k: round(v.item(), 6) for k, v in metrics.items()} == {
        "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2, "rewards/accuracies": 1.0,
        "logps/chosen": -1.0, "logps/rejected": -3.0,
    }  # fmt: skip


def test_running_mean_is_the_mean_of_what_it_was_given():
    running = RunningMean()
    assert running.update(torch.tensor([1.0, 3.0])) == 2.0 and running.update(torch.tensor([5.0])) == 3.0
