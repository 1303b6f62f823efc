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
