"""`nnxlm data bench`: the input pipeline alone, from the command line (here on a mixture fiddler)."""

import json

from nnxlm import cli


def _corpus(tmp_path):
    for name, count in (("code", 40), ("web", 40)):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"text": f"{name} document {i} " + "word " * (i % 9)}) for i in range(count)]
        (tmp_path / name / "part.jsonl").write_text("\n".join(lines) + "\n")


def test_data_bench_times_a_mixture_and_compares_with_the_last_run(tmp_path, capsys):
    _corpus(tmp_path)
    weights = {f"{tmp_path}/code/*.jsonl": 3, f"{tmp_path}/web/*.jsonl": 1}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens_per_s": 100.0}) + "\n" for s in (1, 2)))
    args = ["data", "bench", "--recipe", "tiny", "--recipe", "set:model.vocab_size=512", "--seconds", "0.5"]
    args += ["--recipe", f"fiddler:mixture({weights!r})"]
    tokenizer = ["tokenizer", "train", "--data", f"{tmp_path}/code/*.jsonl", "--data", f"{tmp_path}/web/*.jsonl"]
    tokenizer += ["--vocab_size", "512"]
    assert cli.main([*tokenizer, "--output", str(run / "tokenizer.model")]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--workdir", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data of the recipe: Mixture, 8 rows × 64 tokens a batch")
    assert "first batch after" in out[1]
    rate = float(out[2].split(" batches/s, ")[1].split(" tokens/s")[0].replace(",", ""))
    assert rate > 0
    assert out[3].startswith(f"the last training run in {run} consumed 100 tokens/s: the pipeline delivers")


def test_mixture_fiddler_names_sources_by_directory(tmp_path):
    from nnxlm.recipes.directives import resolve

    _corpus(tmp_path)
    weights = {f"{tmp_path}/code/*.jsonl": 0.7, f"{tmp_path}/web/*.jsonl": 0.3}
    cfg = resolve(["tiny", f"fiddler:mixture({weights!r}, eval_fraction=0.1)"])
    assert list(cfg.train_data.names) == ["code", "web"] and list(cfg.train_data.weights) == [0.7, 0.3]
    import fiddle as fdl

    train, evl = fdl.build(cfg.train_data), fdl.build(cfg.eval_data)
    assert {k for k, _ in train.documents()} == {0, 1}
    assert set(map(str, train.documents())).isdisjoint(map(str, evl.documents()))


def test_data_bench_bad_seconds_is_one_line(capsys):
    assert cli.main(["data", "bench", "--recipe", "tiny", "--seconds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "nnxlm: error: --seconds is 0.0: give a positive time"
