"""How the transactional loop ends a transaction under faults (streams.loop.TransactionalLoop._finish): a call
that timed out is made again until it ends, however long the fault lasts, since librdkafka refuses every other
transaction call while it is pending; an abortable, fatal or conflicting error goes up at once."""

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.guards import Backoff, Watchdog
from streams.loop import TransactionalLoop


def loop() -> TransactionalLoop:
    """The loop's fault handling alone (no consumer or producer: _finish uses neither)."""
    bare = object.__new__(TransactionalLoop)
    bare._watchdog = Watchdog(90.0)
    bare._faults = Backoff(logging.getLogger("test"), first_s=0.0, most_s=0.0)
    return bare


def failing(errors: list[KafkaError]):
    """A call that raises each of `errors` in turn, then returns; it counts its calls."""
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        if len(calls) <= len(errors):
            raise KafkaException(errors[len(calls) - 1])

    return call, calls


def test_a_commit_that_keeps_timing_out_is_made_again_until_it_ends():
    timeout = KafkaError(KafkaError._TIMED_OUT, "commit_transaction timed out", retriable=True)
    call, calls = failing([timeout] * 40)  # far past the minute the loop once gave up after (12 tries)
    loop()._finish(call)
    assert len(calls) == 41


@pytest.mark.parametrize("error", [
    KafkaError(KafkaError._CONFLICT, "Conflicting commit_transaction API call is already in progress", retriable=True),
    KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True),
    KafkaError(KafkaError._FENCED, "fenced", fatal=True),
])
def test_an_abortable_fatal_or_conflicting_error_goes_up_at_once(error):
    timeout = KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True)
    call, calls = failing([timeout, error])
    with pytest.raises(KafkaException) as raised:
        loop()._finish(call)
    assert raised.value.args[0].code() == error.code() and len(calls) == 2


class Producer:
    """abort_transaction raising each of `errors` in turn, then returning."""

    def __init__(self, errors: list[KafkaError]) -> None:
        self.call, self.calls = failing(errors)

    def abort_transaction(self, _timeout: float) -> None:
        self.call()


def test_an_abort_that_timed_out_is_made_again_until_it_ends_and_nothing_to_abort_is_no_error():
    timeout = KafkaError(KafkaError._TIMED_OUT, "abort_transaction timed out", retriable=True)
    bare = loop()
    bare.producer = Producer([timeout] * 5)  # the broker away for five tries: the abort stays pending till it ends
    bare._abort()
    assert len(bare.producer.calls) == 6
    bare.producer = Producer([KafkaError(KafkaError._STATE, "no transaction in progress")])
    bare._abort()  # none begun, or the commit went through: nothing to do
    assert len(bare.producer.calls) == 1
    bare.producer = Producer([KafkaError(KafkaError._CONFLICT, "Conflicting commit_transaction API call", retriable=True)])
    with pytest.raises(KafkaException):
        bare._abort()  # another call pending that this loop cannot resume: the process ends
