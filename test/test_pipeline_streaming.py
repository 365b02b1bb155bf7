"""Stamp pairing, latest-frame mailbox and diagnostics statistics (ROS-free)."""

import threading
import time

import pytest

from sam_gap_ros.streaming import LatencyWindow, LatestSlot, RateMeter, StampPairer


def test_pairs_within_tolerance_in_either_arrival_order():
    pairer = StampPairer(tolerance=0.01, max_wait=1.0)
    assert pairer.add_secondary(1.000, 'd1', now=0.0) == []
    ready = pairer.add_primary(1.005, 'c1', now=0.0)
    assert [(p.primary, p.secondary) for p in ready] == [('c1', 'd1')]
    # colour first, depth later
    assert pairer.add_primary(2.0, 'c2', now=0.1) == []
    assert pairer.pending == 1
    ready = pairer.add_secondary(2.008, 'd2', now=0.12)
    assert [(p.primary, p.secondary, p.stamp) for p in ready] == [('c2', 'd2', 2.0)]
    assert pairer.unpaired == 0


def test_closest_depth_wins():
    pairer = StampPairer(tolerance=0.05, max_wait=1.0)
    for stamp, name in ((0.96, 'far'), (0.99, 'near'), (1.03, 'mid')):
        pairer.add_secondary(stamp, name, now=0.0)
    assert pairer.add_primary(1.0, 'c', now=0.0)[0].secondary == 'near'


def test_out_of_tolerance_is_released_unpaired_when_newer_depth_arrives():
    pairer = StampPairer(tolerance=0.01, max_wait=10.0)
    assert pairer.add_primary(1.0, 'c', now=0.0) == []
    ready = pairer.add_secondary(1.5, 'late', now=0.1)
    assert [(p.primary, p.secondary) for p in ready] == [('c', None)]
    assert pairer.unpaired == 1


def test_frames_are_released_in_stamp_order_so_the_slot_keeps_the_newest():
    """Depth for the newer frame also gives up on the older one: newer one last."""
    pairer = StampPairer(tolerance=0.03, max_wait=10.0)
    assert pairer.add_primary(1.00, 'older', now=0.0) == []
    assert pairer.add_primary(1.10, 'newer', now=0.1) == []

    ready = pairer.add_secondary(1.10, 'depth', now=0.11)

    assert [(p.primary, p.secondary) for p in ready] == [('older', None), ('newer', 'depth')]
    slot = LatestSlot()
    for pair in ready:
        slot.put(pair)
    assert slot.take(timeout=0.1).primary == 'newer' and slot.dropped == 1


def test_stalled_depth_times_out():
    pairer = StampPairer(tolerance=0.01, max_wait=0.2)
    assert pairer.add_primary(1.0, 'c', now=5.0) == []
    assert pairer.poll(now=5.1) == []
    ready = pairer.poll(now=5.2)
    assert [(p.primary, p.secondary) for p in ready] == [('c', None)]
    assert pairer.pending == 0 and pairer.unpaired == 1


def test_pending_is_bounded_and_overflow_counted():
    pairer = StampPairer(tolerance=0.01, max_wait=100.0, max_pending=2)
    for i in range(5):
        pairer.add_primary(float(i), i, now=0.0)
    assert pairer.pending == 2 and pairer.dropped == 3


def test_invalid_settings_refused():
    with pytest.raises(ValueError):
        StampPairer(tolerance=-1.0, max_wait=0.1)


def test_latest_slot_keeps_newest_and_counts_drops():
    slot = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.take(timeout=0.0) == 4
    assert slot.dropped == 4 and slot.put_count == 5
    assert slot.take(timeout=0.01) is None
    slot.put(7)
    assert slot.clear() and slot.dropped == 5
    assert not slot.clear()


def test_latest_slot_wakes_blocked_taker_and_close():
    slot = LatestSlot()
    got = []
    taker = threading.Thread(target=lambda: got.append(slot.take(timeout=5.0)))
    taker.start()
    slot.put('frame')
    taker.join(timeout=5.0)
    assert got == ['frame']
    closer = threading.Thread(target=lambda: got.append(slot.take(timeout=5.0)))
    start = time.monotonic()
    closer.start()
    slot.close()
    closer.join(timeout=5.0)
    assert got == ['frame', None] and time.monotonic() - start < 4.0
    slot.reopen()
    slot.put(1)
    assert slot.take(timeout=0.0) == 1


def test_rate_meter_and_latency_percentiles():
    rate = RateMeter(window=2.0)
    assert rate.rate(0.0) == 0.0
    for i in range(21):
        rate.tick(i * 0.1)
    assert rate.rate(2.0) == pytest.approx(10.0, rel=0.01)
    assert rate.rate(10.0) == 0.0  # all events left the window
    window = LatencyWindow(size=100)
    assert window.percentile_ms(50) is None
    for i in range(1, 101):
        window.add(i / 1000.0)
    assert window.percentile_ms(50) == pytest.approx(50.5)
    assert window.percentile_ms(95) == pytest.approx(95.05)
    window.add(1.0)  # evicts the oldest sample
    assert len(window) == 100 and window.percentile_ms(100) == pytest.approx(1000.0)


def test_clear_counts_waiting_colour_frames_as_dropped():
    pairer = StampPairer(tolerance=0.01, max_wait=10.0)
    pairer.add_primary(1.0, 'c', now=0.0)
    pairer.clear()
    assert pairer.pending == 0 and pairer.dropped == 1


def test_equally_close_depth_pairs_with_the_newest():
    # A driver that stamps every frame alike (here 0): colour must pair with current depth,
    # not with the oldest depth still held.
    pairer = StampPairer(tolerance=0.01, max_wait=1.0)
    for name in ('old', 'older_but_one', 'current'):
        pairer.add_secondary(0.0, name, now=0.0)
    assert pairer.add_primary(0.0, 'c', now=0.0)[0].secondary == 'current'


@pytest.mark.parametrize('depth_first', [True, False])
def test_stamps_going_back_start_pairing_over(depth_first):
    # A bag played in a loop: stamps jump from ~100 s back to ~0 s. Every frame after the
    # jump must pair with its own depth as before it, whichever stream arrives first.
    pairer = StampPairer(tolerance=0.01, max_wait=10.0)
    stamps = [100.0 + i / 30 for i in range(8)] + [i / 30 for i in range(8)]
    pairs = []
    for now, stamp in enumerate(stamps):
        calls = [(pairer.add_secondary, f'd{stamp}'), (pairer.add_primary, f'c{stamp}')]
        for add, name in (calls if depth_first else calls[::-1]):
            pairs += add(stamp, name, now=float(now))
    assert [(p.primary, p.secondary) for p in pairs] == [(f'c{s}', f'd{s}') for s in stamps]
    assert pairer.unpaired == 0 and pairer.pending == 0
    assert pairer.time_jumps == 1


@pytest.mark.parametrize('lag', [1, 2])
def test_depth_lagging_colour_at_a_loop_point(lag):
    """Depth frames from before the loop arrive after the first colour frames after it.

    They used to be held: the new frames looked late (released without depth), came out
    before the older frame they had overtaken (which then took the latest-frame slot), and
    the jump was counted twice.
    """
    pairer = StampPairer(tolerance=0.01, max_wait=1.0)
    stamps = [100.0 + i / 10 for i in range(6)] + [i / 10 for i in range(6)]
    events = sorted([(i, 'colour', s) for i, s in enumerate(stamps)]
                    + [(i + lag, 'depth', s) for i, s in enumerate(stamps)])
    released = []
    for index, kind, stamp in events:
        now = index / 10
        add = pairer.add_primary if kind == 'colour' else pairer.add_secondary
        released += add(stamp, f'{kind[0]}{stamp:g}', now)
        released += pairer.poll(now)
    released += pairer.poll(100.0)
    after = [(p.primary, p.secondary) for p in released if p.stamp < 50]
    assert after == [(f'c{s:g}', f'd{s:g}') for s in stamps[6:]]
    # Released in arrival order across the jump: nothing from before it comes after.
    first_after = next(i for i, p in enumerate(released) if p.stamp < 50)
    assert all(p.stamp < 50 for p in released[first_after:])
    # The colour frames still waiting for depth at the jump are dropped, not paired late.
    assert len(released) + pairer.dropped == len(stamps) and pairer.dropped == lag
    assert pairer.unpaired == 0 and pairer.time_jumps == 1


def test_small_steps_back_are_not_jumps():
    # Out-of-order stamps within a second (a driver's jitter) keep the held depth.
    pairer = StampPairer(tolerance=0.01, max_wait=10.0)
    pairer.add_secondary(10.0, 'd10', now=0.0)
    pairer.add_secondary(9.5, 'd9.5', now=0.0)
    assert pairer.add_primary(10.0, 'c', now=0.0)[0].secondary == 'd10'
    assert pairer.time_jumps == 0
    # The jump threshold is never below twice the tolerance.
    assert StampPairer(tolerance=0.8, max_wait=1.0).max_jump == pytest.approx(1.6)
