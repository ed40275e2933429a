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


def test_take_free_keeps_one_frame_per_source_out_until_released():
    slots = LatestFrameSlots()
    for source in ('front', 'rear', 'left'):
        slots.put(source + '1', source=source)
    assert slots.take_free(2, timeout=0) == [('front', 'front1'), ('rear', 'rear1')]
    assert slots.out == 2 and slots.waiting == 1
    assert slots.take_free(2, timeout=0) == []  # two out: the limit
    slots.put('front2', source='front')
    slots.put('front3', source='front')  # the newest waiting frame wins while front is out
    slots.release('rear')
    assert slots.take_free(2, timeout=0) == [('left', 'left1')]  # front still has one out
    slots.release('front')
    assert slots.take_free(3, timeout=0) == [('front', 'front3')]
    assert slots.dropped == 1


def test_take_free_waits_for_a_release_and_close_wakes_it():
    slots = LatestFrameSlots()
    slots.put('a1', source='a')
    assert slots.take_free(1, timeout=0) == [('a', 'a1')]
    slots.put('a2', source='a')
    got = []
    worker = threading.Thread(target=lambda: got.append(slots.take_free(1, timeout=30)))
    worker.start()
    slots.release('a')
    worker.join(5)
    assert got == [[('a', 'a2')]]
    waiter = threading.Thread(target=lambda: got.append(slots.take_free(1, timeout=30)))
    waiter.start()
    slots.close()
    waiter.join(5)
    assert not waiter.is_alive() and got[-1] == []
