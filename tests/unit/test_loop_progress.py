"""The stalled-consumer rule of the transactional loop (streams.guards.Progress): a partition with records
to read whose position does not move for the limit is stalled; progress or nothing to read is not."""

from streams.guards import Progress

A, B = ("features", 0), ("features", 1)


def test_a_partition_behind_at_the_same_position_for_the_limit_is_stalled():
    progress = Progress(90.0)
    assert not progress.stalled({A: 10}, now=0.0)
    assert not progress.stalled({A: 10}, now=60.0)
    assert progress.stalled({A: 10}, now=90.0)


def test_a_position_that_moves_starts_the_count_again():
    progress = Progress(90.0)
    assert not progress.stalled({A: 10}, now=0.0)
    assert not progress.stalled({A: 400}, now=80.0)
    assert not progress.stalled({A: 400}, now=169.0)
    assert progress.stalled({A: 400}, now=170.0)


def test_no_position_yet_counts_like_a_position_that_does_not_move():
    progress = Progress(90.0)
    assert not progress.stalled({A: -1001}, now=0.0)
    assert progress.stalled({A: -1001}, now=95.0)


def test_caught_up_in_between_starts_the_count_again():
    progress = Progress(90.0)
    assert not progress.stalled({A: 10}, now=0.0)
    assert not progress.stalled({}, now=50.0)  # nothing to read: not behind
    assert not progress.stalled({A: 10}, now=60.0)
    assert not progress.stalled({A: 10}, now=149.0)
    assert progress.stalled({A: 10}, now=150.0)


def test_each_partition_counts_from_when_it_stopped_moving():
    progress = Progress(90.0)
    assert not progress.stalled({A: 10}, now=0.0)
    assert not progress.stalled({A: 20, B: 5}, now=50.0)
    assert not progress.stalled({A: 30, B: 5}, now=139.0)
    assert progress.stalled({A: 40, B: 5}, now=140.0)
