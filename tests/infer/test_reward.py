"""`xtune reward score`: both answers of each pair scored by a merged reward model or a reward checkpoint (the same
numbers), the pairwise accuracy, JSONL output, and bad input named by file and line."""

import json

import pytest
from typer.testing import CliRunner

from xtune.cli import app
from xtune.convert.merge import merge
from xtune.errors import DataError, XtuneError
from xtune.infer.reward import accuracy, score_file
from xtune.testing.tasks import tiny_dataset_path
from tests.models.test_reward import BASE, trained_reward_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    _, _, checkpoint, _ = trained_reward_checkpoint(folder / "run", "lora")
    return checkpoint, merge(BASE, checkpoint, folder / "merged", fp32=True)


def test_a_merged_model_and_its_checkpoint_score_the_pairs_alike(reward_model):
    checkpoint, merged = reward_model
    data = tiny_dataset_path("antonym-pairs-heldout")
    from_merged = score_file(str(merged), data, dtype="fp32")
    from_checkpoint = score_file(str(checkpoint), data, dtype="fp32")
    assert len(from_merged) == 38 and from_merged[0].location.endswith("antonym-pairs-heldout.jsonl:1")
    assert all(abs(a.chosen - b.chosen) < 1e-4 and abs(a.rejected - b.rejected) < 1e-4
               for a, b in zip(from_merged, from_checkpoint))  # fmt: skip
    assert accuracy(from_merged) == sum(s.chosen > s.rejected for s in from_merged) / 38


def test_the_cli_prints_each_pairs_scores_and_the_accuracy_and_writes_jsonl(reward_model, tmp_path):
    _, merged = reward_model
    records = [{"prompt": "Opposite of hot?", "chosen": "cold", "rejected": "COLD!"},
               {"messages": [{"role": "user", "content": "Opposite of big?"}],
                "chosen": {"role": "assistant", "content": "small"},
                "rejected": {"role": "assistant", "content": "SMALL!"}}]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "scores.jsonl"
    result = runner.invoke(app, ["reward", "score", str(merged), "--input", str(data), "--output", str(output),
                                 "--dtype", "fp32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [w["location"] for w in written] == [f"{data}:1", f"{data}:2"]
    for line, score in zip(lines, written):
        location, chosen, rejected = line.split("\t")
        assert location == score["location"] and float(chosen) == pytest.approx(score["chosen"], rel=1e-5)
    correct = sum(w["chosen"] > w["rejected"] for w in written)
    assert lines[-1] == f"accuracy {correct / 2:.1%}: the chosen answer scored higher in {correct} of 2 pairs"
    again = runner.invoke(app, ["reward", "score", str(merged), "--input", str(data), "--output", str(output)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_bad_input_and_a_model_that_is_no_reward_model_are_clear_errors(reward_model, tmp_path):
    _, merged = reward_model
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "hi"}\n')
    with pytest.raises(DataError, match=f"{data}:2"):
        score_file(str(merged), data)
    with pytest.raises(XtuneError, match="is not a reward model"):
        score_file(BASE, tiny_dataset_path("antonym-pairs-heldout"))
