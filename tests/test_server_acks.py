"""server/acks.py: a request is acked only after its own reply's PUBACK, across packet-id wrap-around."""

from __future__ import annotations

from ddnn_server.acks import AckLedger


def test_puback_before_registration_acks_at_once() -> None:
    ledger: AckLedger[str] = AckLedger()
    started = ledger.before_publish()
    assert ledger.puback(7) is None  # the network thread was faster than publish() returning
    assert ledger.after_publish(7, started, "request A") is True
    assert ledger.wait_empty(0.0)


def test_puback_after_registration_returns_the_request() -> None:
    ledger: AckLedger[str] = AckLedger()
    started = ledger.before_publish()
    assert ledger.after_publish(9, started, "request B") is False
    assert not ledger.wait_empty(0.0)
    assert ledger.puback(9) == "request B"
    assert ledger.wait_empty(0.0)


def test_an_old_puback_with_a_wrapped_packet_id_never_acks_a_new_request() -> None:
    ledger: AckLedger[str] = AckLedger()
    # A status message's PUBACK (mid 5) that no reply waited for ...
    assert ledger.puback(5) is None
    # ... and 65535 publishes later a reply gets mid 5 again: it must wait for its own PUBACK.
    started = ledger.before_publish()
    assert ledger.after_publish(5, started, "request C") is False
    assert ledger.puback(5) == "request C"


def test_reset_forgets_what_waited() -> None:
    ledger: AckLedger[str] = AckLedger()
    ledger.after_publish(3, ledger.before_publish(), "request D")
    ledger.reset()
    assert ledger.wait_empty(0.0)
    assert ledger.puback(3) is None
