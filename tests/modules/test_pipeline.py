"""The pipeline schedule's arithmetic (nnxlm.modules.pipeline): the bubble fraction, the order in
which micro-batches meet the layer chunks, and what `nnxlm inspect` prints. Training on pipeline
meshes against one device is tests/sharding (8 fake devices)."""

import fiddle as fdl
import pytest
from flax import nnx

from nnxlm.modules.pipeline import PipelineSchedule, _Plan, bubble_fraction, schedule_problem
from nnxlm.recipes import tiny
from nnxlm.report import pipeline_lines


def test_bubble_fraction_is_idle_stage_iterations_over_all():
    assert bubble_fraction(4, 8) == 3 / 11  # GPipe: (S - 1) / (M + S - 1)
    assert bubble_fraction(4, 8, repeats=2) == 3 / 19  # circular: (S - 1) / (R M + S - 1)
    assert bubble_fraction(1, 5) == 0.0
    for stages, microbatches, repeats in ((2, 2, 1), (4, 2, 1), (2, 4, 3), (4, 4, 2)):
        item_ts = _Plan(stages, microbatches, repeats).item_ts()
        busy = ((item_ts >= 0) & (item_ts < repeats * microbatches)).sum()
        assert 1 - busy / item_ts.size == pytest.approx(bubble_fraction(stages, microbatches, repeats))


@pytest.mark.parametrize("stages, microbatches, repeats", [(2, 2, 1), (4, 2, 1), (3, 5, 1), (2, 2, 2), (3, 4, 3)])
def test_every_micro_batch_meets_every_chunk_once_in_layer_order(stages, microbatches, repeats):
    """A host simulation of run_pipeline's loop on _Plan.steps(): stage s in round r applies chunk
    r S + s; the queue hands each micro-batch back to stage 0 for its next round."""
    load, load_slot, round_ts, micro_ts, store, store_slot = (
        x.tolist() for x in _Plan(stages, microbatches, repeats).steps()
    )
    queue = [[] for _ in range(microbatches)]  # the chunks each micro-batch went through, in order
    state = [None] * stages
    for t in range(len(load)):
        if load[t]:
            state[0] = list(queue[load_slot[t]])
        for s in range(stages):
            if state[s] is not None and 0 <= t - s < repeats * microbatches:
                assert micro_ts[t][s] == (t - s) % microbatches
                state[s] = state[s] + [round_ts[t][s] * stages + s]
        state = [state[-1]] + state[:-1]  # one stage on, the last to stage 0
        if store[t]:
            queue[store_slot[t]] = state[0]
    assert queue == [list(range(stages * repeats))] * microbatches


def test_a_problem_names_the_field_and_the_fix():
    assert schedule_problem(8, 8, 4, PipelineSchedule(4, "circular", 2)) is None
    assert schedule_problem(6, 8, 4, PipelineSchedule())[0] == "num_layers"
    assert schedule_problem(8, 6, 2, PipelineSchedule(4))[0] == "pipeline_microbatches"
    assert schedule_problem(8, 8, 4, PipelineSchedule(2, "circular", 2))[:2] == ("pipeline_microbatches", 2)


@pytest.mark.parametrize(
    "schedule, bubble",
    [
        ({}, "bubble fraction (S - 1) / (R M + S - 1) = 1/5 = 20.0%"),
        ({"pipeline_schedule": "circular", "pipeline_repeats": 2}, "= 1/9 = 11.1%"),
    ],
)
def test_inspect_prints_the_bubble_fraction_and_what_a_stage_holds(schedule, bubble):
    cfg = tiny()
    cfg.mesh, cfg.pipeline_microbatches = {"pipeline": 2, "data": 2, "tensor": 2}, 4
    for field, value in schedule.items():
        setattr(cfg, field, value)
    trainer = fdl.build(cfg)
    model = nnx.eval_shape(lambda: trainer.model_factory(rngs=nnx.Rngs(0)))
    first, per_stage = pipeline_lines(trainer, model, activations=2**20)
    assert first.startswith("pipeline: 2 stages of 2 layers") and "4 micro-batches of 2 rows" in first
    assert first.endswith(bubble), first
    assert "per stage" in per_stage and "activations about 0.5 MiB" in per_stage
    cfg.mesh = {"data": 8}
    assert pipeline_lines(fdl.build(cfg), model, 0) == []
