import pytest

from nnxlm import metrics


@pytest.fixture
def measurements(tmp_path, monkeypatch):
    """The machine's peak cache in tmp_path; each measurement returns the next of `values`."""
    monkeypatch.setenv("NNXLM_CACHE_DIR", str(tmp_path))
    values, calls = [100e9, 80e9, 90e9], []

    def measure(size, repeats):
        calls.append(size)
        return values[(len(calls) - 1) % 3]

    monkeypatch.setattr(metrics, "measure_matmul_peak", measure)
    return calls


def test_the_cpu_peak_is_the_best_of_several_measurements_kept_once_per_machine(measurements, monkeypatch):
    assert metrics.measured_peak_flops() == 100e9  # the best of the three sizes
    assert len(measurements) == 3
    assert metrics.measured_peak_flops() == 100e9  # from the cache: no new measurement
    assert len(measurements) == 3
    assert metrics.remember_peak_flops(50e9) == 100e9  # a slower rate never lowers it
    assert metrics.remember_peak_flops(120e9) == 120e9
    assert metrics.measured_peak_flops() == 120e9


def test_mfu_never_exceeds_one_and_a_step_time_never_raises_the_machines_peak(measurements, monkeypatch):
    monkeypatch.setattr(metrics, "device_peak_flops", lambda: metrics.measured_peak_flops())
    peak = metrics.PeakFlops(None, devices=2)  # 100 GFLOP/s a device
    assert peak.utilization(100e9) == pytest.approx(0.5)
    assert len(measurements) == 3
    assert peak.utilization(300e9) == 1.0  # faster than the peak: this run's peak is 150 a device
    assert len(measurements) == 6  # measured once more, which found 100 again
    assert peak.utilization(150e9) == pytest.approx(0.5)
    assert peak.utilization(600e9) == 1.0 and len(measurements) == 6  # measured once a run
    assert metrics.measured_peak_flops() == 100e9  # a step's time (busy host, bad timing) is not kept
    assert metrics.PeakFlops(50e9, devices=1).utilization(100e9) == 2.0  # a peak the recipe gives is the user's


class Output:
    """A step's outputs whose readiness the test sets."""

    def __init__(self):
        self.ready = False

    def is_ready(self):
        return self.ready


def test_a_step_fetched_right_after_the_previous_one_is_timed_as_the_others(monkeypatch):
    """On XLA:CPU a small step may run inside its dispatch. The trainer fetches step n's metrics
    after dispatching n + 1, and at a checkpoint fetches n + 1's at once: timed by those fetches,
    n took n + 1's time and n + 1 came out near 0 s (an MFU far above the others')."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = metrics.StepClock()
    one, two, three = Output(), Output(), Output()
    now[0], one.ready = 1.0, True  # step 1 runs in its dispatch (1 s) and is seen done right after it
    clock.look((1, one))
    now[0], two.ready = 2.0, True  # so does step 2, which ends at a checkpoint
    clock.look((1, one), (2, two))
    now[0] = 2.5  # the loop fetches step 1, then step 2 at once
    assert clock.step_time(1) == 1.0
    now[0] = 2.6
    assert clock.step_time(2) == 1.0
    now[0] = 9.0  # the checkpoint is written: no step's time
    clock.restart()
    now[0] = 9.5  # step 3 runs on the device after its dispatch: seen done when its metrics arrive
    clock.look((3, three))
    now[0], three.ready = 11.0, True
    assert clock.step_time(3) == 2.0
    four, five = Output(), Output()
    now[0] = 12.0  # step 4 is not done when step 5 is dispatched; both are seen done after that
    clock.look((4, four))
    now[0], four.ready, five.ready = 13.0, True, True
    clock.look((4, four), (5, five))
    assert clock.step_time(4) == 1.0 and clock.step_time(5) == 1.0  # neither at 0 s
