import random

from xtune.data.encode import IGNORE_INDEX, Encoded
from xtune.data.loader import collate, length_grouped_batches, shuffled_batches


def padded_tokens(batches, lengths):
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_grouping_keeps_every_sample_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    grouped = length_grouped_batches(lengths, batch_size=8, seed=3)
    plain = shuffled_batches(len(lengths), batch_size=8, seed=3)
    assert sorted(i for batch in grouped for i in batch) == list(range(1000))
    assert all(len(batch) <= 8 for batch in grouped)
    assert padded_tokens(grouped, lengths) < 0.7 * padded_tokens(plain, lengths)
    assert length_grouped_batches(lengths, 8, seed=3) == grouped != length_grouped_batches(lengths, 8, seed=4)


def test_collate_pads_right_with_no_loss_on_padding():
    batch = collate([Encoded([1, 5, 6], [IGNORE_INDEX, 5, 6]), Encoded([1, 7], [IGNORE_INDEX, 7])], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
