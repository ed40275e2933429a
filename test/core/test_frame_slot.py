"""The newest frame wins; waiting frames are replaced and counted, never queued."""
import threading

from qwen_vl_perception.frame_slot import LatestFrameSlots


def test_newer_frame_replaces_waiting_one_and_counts_the_drop():
    slots = LatestFrameSlots()
    assert slots.put(1) is False
    assert slots.put(2) is True
    assert slots.put(3) is True
    assert slots.take_all(timeout=0) == [3]
    assert (slots.accepted, slots.dropped) == (3, 2)
    assert slots.take_all(timeout=0) == []


def test_sources_keep_one_frame_each_for_batching():
    slots = LatestFrameSlots()
    slots.put('a1', source='front')
    slots.put('b1', source='rear')
    slots.put('a2', source='front')
    assert slots.take_all(timeout=0) == ['a2', 'b1']
    assert slots.dropped == 1


def test_take_waits_for_a_frame_and_close_wakes_it():
    slots = LatestFrameSlots()
    got = []
    worker = threading.Thread(target=lambda: got.append(slots.take_all(timeout=5)))
    worker.start()
    slots.put('frame')
    worker.join(2)
    assert got == [['frame']]
    waiter = threading.Thread(target=lambda: got.append(slots.take_all(timeout=30)))
    waiter.start()
    slots.close()
    waiter.join(2)
    assert not waiter.is_alive() and got[-1] == []


def test_urgent_items_come_first_and_are_never_dropped():
    slots = LatestFrameSlots()
    slots.put('frame 1', 'camera')
    slots.put_urgent('goal a')
    slots.put_urgent('goal b')
    slots.put('frame 2', 'camera')  # replaces frame 1; the goals stay
    assert slots.take_all(timeout=0, frames=False) == ['goal a', 'goal b']
    assert slots.take_all(timeout=0) == ['frame 2']
    slots.put('frame 3', 'camera')
    assert slots.discard_waiting() == 1 and slots.take_all(timeout=0) == []
    assert slots.dropped == 1
