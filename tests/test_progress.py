from nnxlm.progress import Progress


def test_a_log_line_is_one_line_however_long(capsys):
    """Not on a terminal (a log file, a pipe), each logged step is one greppable line."""
    progress = Progress(total=10, start=0)
    record = {"loss": 2.5, "tokens_per_s": 12345.0, "mfu": 0.25, "lr": 3e-4}
    record.update({f"mixture/source_with_a_long_name_{i}": 1.0 for i in range(4)})
    progress.update(2, record, log=True)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step      2  loss 2.500") and lines[0].endswith("lr 3.00e-04")
