"""The training step: a graphed step updates the weights once per batch, exactly as the eager one
does, and paired arms see the same batches (common random numbers)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipeline.config import Config
from pipeline.engine import Recipe, Runtime, TrainStep, build_optimizer, train_one_epoch
from pipeline.models import build_model

# Pure logic: no MLflow store is made for these tests.
pytestmark = pytest.mark.no_store

K = 7  # steps: two warm-up calls, the capturing call, four replays


class CountingGraphs:
    """Stand-in for the CUDA machinery with CUDA's semantics: a warm-up runs its function, a
    capture records it without running it, and each replay runs it once, as recorded. The step
    is captured with every grad None, so the recorded backward writes the grads afresh (it
    does not add to them); a replay here reproduces that by starting from None grads."""

    def __init__(self, params):
        self.params = list(params)
        self.eager_calls = self.captures = self.replays = 0

    def eager(self, fn):
        self.eager_calls += 1
        fn()

    def capture(self, fn):
        self.captures += 1
        outer = self

        class Graph:
            def replay(self):
                outer.replays += 1
                for p in outer.params:
                    p.grad = None
                fn()

        return Graph()


def _setup(cfg: Config, n: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    rt = Runtime(cfg)
    model = rt.model(build_model(cfg))
    images = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).to(rt.device)
    labels = (torch.arange(n) % 7).to(rt.device)
    return rt, model, images, labels


def _batches(n: int, bs: int, k: int):
    g = torch.Generator().manual_seed(2)
    return [(torch.randperm(n, generator=g)[:bs], torch.rand(bs, 7, generator=g))
            for _ in range(k)]


def _adam_steps(opt: torch.optim.Optimizer) -> set[int]:
    return {int(st["step"]) for st in opt.state.values()}


def test_graphed_step_updates_once_per_batch_like_the_eager_step():
    """The capturing call used to run its batch eagerly and then replay the fresh graph: two
    Adam steps and two BatchNorm updates for one batch, at every start and every resume."""
    cfg = Config(stage="improved", width=0.125, batch_size=16, augment=True, device="cpu",
                 precision="fp32", label_smoothing=0.1, grad_clip=1.0)
    rt, model, images, labels = _setup(cfg)
    twin = copy.deepcopy(model)
    graphs = CountingGraphs(model.parameters())
    graphed = TrainStep(model, build_optimizer(cfg, model.parameters()), rt, images, labels,
                        Recipe.of(cfg), graphs=graphs)
    eager = TrainStep(twin, build_optimizer(cfg, twin.parameters()), rt, images, labels,
                      Recipe.of(cfg))
    assert graphed.graphed and not eager.graphed
    batches = _batches(len(labels), cfg.batch_size, K)
    for step in (graphed, eager):
        torch.manual_seed(3)  # the same dropout masks in both
        for idx, u in batches:
            step(idx, u)
    assert (graphs.eager_calls, graphs.captures, graphs.replays) == \
        (TrainStep.WARMUP - 1, 1, K - TrainStep.WARMUP + 1)
    assert _adam_steps(graphed.opt) == _adam_steps(eager.opt) == {K}
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == K for m in bn)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The running sums count every batch once.
    assert int(graphed.correct) == int(eager.correct)
    assert float(graphed.loss_sum) == pytest.approx(float(eager.loss_sum), rel=1e-6)


@pytest.mark.gpu
def test_cuda_graph_steps_match_eager_steps_on_the_gpu():
    """k graphed steps beside k eager steps from the same state, and beside k eager steps with
    the capturing call's batch stepped twice (what the old capture did). The graphed weights
    must sit far nearer the first: the yardstick is the doubled step's own distance, measured
    here, since Adam moves nearly every weight by about lr per step and the GPU's reduction
    order alone moves some weights apart."""
    k = 8
    # fp32 and no dropout: a graph's replays draw dropout masks at other RNG offsets than eager
    # steps do, and bf16 rounding flips the sign of near-zero Adam updates; both move the
    # weights apart for reasons that are not the one tested here.
    graph_cfg = Config(stage="improved", width=0.5, batch_size=64, augment=True, device="cuda",
                       precision="fp32", label_smoothing=0.1, grad_clip=1.0, conv_dropout=0.0,
                       fc_dropout=0.0)
    eager_cfg = dataclasses.replace(graph_cfg, cuda_graphs=False)
    rt_g, model_g, images, labels = _setup(graph_cfg, n=256)
    rt_e = Runtime(eager_cfg)
    assert rt_g.graphs and not rt_e.graphs
    model_e, model_2 = copy.deepcopy(model_g), copy.deepcopy(model_g)
    step_g = TrainStep(model_g, build_optimizer(graph_cfg, model_g.parameters(), capturable=True),
                       rt_g, images, labels, Recipe.of(graph_cfg))
    step_e, step_2 = (TrainStep(m, build_optimizer(eager_cfg, m.parameters()), rt_e, images,
                                labels, Recipe.of(eager_cfg)) for m in (model_e, model_2))
    assert step_g.graphed and not step_e.graphed
    batches = _batches(len(labels), 64, k)
    at = TrainStep.WARMUP - 1  # the capturing call's batch
    doubled = batches[:at + 1] + batches[at:]
    for step, seq in ((step_g, batches), (step_e, batches), (step_2, doubled)):
        for idx, u in seq:
            step(idx.cuda(), u.cuda())
        torch.cuda.synchronize()
    assert step_g.graph is not None
    assert _adam_steps(step_g.opt) == _adam_steps(step_e.opt) == {k}

    def distance(a, b) -> float:
        return sum((p.float() - q.float()).abs().sum().item()
                   for p, q in zip(a.parameters(), b.parameters()))

    yardstick = distance(model_e, model_2)
    assert yardstick > 0
    assert distance(model_g, model_e) < 0.25 * yardstick, (distance(model_g, model_e), yardstick)


class RecordingStep(TrainStep):
    """A real step that also records which images each batch held."""

    def __init__(self, *args):
        super().__init__(*args)
        self.batches: list[list[int]] = []

    def __call__(self, idx, u):
        self.batches.append(idx.tolist())
        super().__call__(idx, u)


@pytest.mark.parametrize("stage", ["basic", "improved"])
def test_arms_with_and_without_augmentation_see_the_same_batches(stage):
    """Common random numbers: an arm without augmentation still draws the augmentation's
    uniforms, so seed s feeds both arms the same batches in the same order, epoch after epoch."""
    seen = {}
    for augment in (True, False):
        cfg = Config(stage=stage, width=0.125, batch_size=8, augment=augment, device="cpu",
                     precision="fp32", batchnorm=stage != "basic")
        rt, model, images, labels = _setup(cfg, n=40)
        step = RecordingStep(model, build_optimizer(cfg, model.parameters()), rt, images, labels,
                             Recipe.of(cfg))
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            train_one_epoch(step, gen)
        seen[augment] = step.batches
    assert len(seen[True]) == 15
    assert seen[True] == seen[False]


# --------------------------------------------------------------------------- schedule, stopping


def _lrs(scheduler: str, batches: int, metrics: list[float], **over) -> list[tuple[str, float]]:
    """The lr after each call the training loop makes: ``batches`` after_batch calls per
    epoch, then after_epoch with that epoch's metric."""
    from pipeline.engine import build_scheduler

    cfg = Config(scheduler=scheduler, epochs=len(metrics), lr=1e-3, **over)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, batches)
    out = []
    for m in metrics:
        for _ in range(batches):
            opt.step()
            sched.after_batch()
            out.append(("batch", opt.param_groups[0]["lr"]))
        sched.after_epoch(m)
        out.append(("epoch", opt.param_groups[0]["lr"]))
    return out


def _changes(trace: list[tuple[str, float]]) -> set[str]:
    """Which kind of call changed the lr."""
    return {kind for (kind, lr), (_, before) in zip(trace[1:], trace) if lr != before}


def test_each_schedule_moves_the_lr_where_it_should():
    flat = [0.5, 0.5, 0.5, 0.5]
    assert _changes(_lrs("onecycle", 3, flat, onecycle_max_lr=1e-2)) == {"batch"}
    assert _changes(_lrs("cosine", 3, flat)) == {"epoch"}
    assert _changes(_lrs("step", 3, flat, step_size=1, step_gamma=0.5)) == {"epoch"}
    assert _changes(_lrs("none", 3, flat)) == set()
    # Plateau follows the metric: no cut while it improves, a cut after `patience` flat epochs.
    rising = _lrs("plateau", 2, [0.1, 0.2, 0.3, 0.4], plateau_patience=1, plateau_factor=0.5)
    assert {lr for _, lr in rising} == {1e-3}
    stalled = _lrs("plateau", 2, [0.4, 0.4, 0.4, 0.4], plateau_patience=1, plateau_factor=0.5)
    epochs = [lr for kind, lr in stalled if kind == "epoch"]
    assert epochs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience_bad_epochs():
    from pipeline.engine import EarlyStopping

    net = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2)
    seen = []
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.55]):
        with torch.no_grad():
            net.weight.fill_(epoch)
        seen.append(stop.update(acc, epoch, net))
    # A tie is no new best; two epochs in a row without one stop it.
    assert seen == [False, False, False, True] and stop.stopped
    assert (stop.best, stop.best_epoch) == (0.6, 1)
    assert float(stop.best_state["weight"][0, 0]) == 1.0
    again = EarlyStopping(patience=2)
    again.load_state_dict(EarlyStopping(patience=2, best=0.6, best_epoch=1,
                                        bad_epochs=1).state_dict())
    assert not again.update(0.65, 2, net) and again.bad_epochs == 0 and again.best_epoch == 2
    never = EarlyStopping(patience=0)
    assert not any(never.update(0.1, e, net) for e in range(50)) and not never.stopped


def test_loading_optimizer_state_keeps_the_lr_tensor_a_graph_reads():
    """A capturable Adam reads its lr from one device tensor, which a captured graph holds on
    to: a checkpoint's lr (another tensor once loaded) must be copied into it, not replace it.
    A plain optimiser gets a float back."""
    import io

    from pipeline.engine import build_optimizer, load_optimizer_state

    cfg = Config(optimizer="adam", lr=1e-3)
    saved = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], capturable=True)
    saved.param_groups[0]["lr"].fill_(3e-4)  # as a scheduler left it
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)

    def state():
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    graphed = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], capturable=True)
    held = graphed.param_groups[0]["lr"]
    load_optimizer_state(graphed, state())
    assert graphed.param_groups[0]["lr"] is held and float(held) == pytest.approx(3e-4)
    plain = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    load_optimizer_state(plain, state())
    lr = plain.param_groups[0]["lr"]
    assert isinstance(lr, float) and lr == pytest.approx(3e-4)


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu_to_the_epoch_of_an_unbroken_run():
    """A GPU run's Adam is capturable (its lr a tensor, its groups' flags saying so); its
    checkpoint, resumed on a CPU, must train the next epoch exactly as a run that never stopped.
    Loaded as torch keeps them, the flags would ask the CPU for a capturable update."""
    import io

    from pipeline.train import Trainer

    cfg = Config(stage="advanced", width=0.125, batch_size=16, epochs=2, augment=True,
                 device="cpu", precision="fp32", seed=3)
    torch.set_num_threads(1)
    x, y = _data(48)
    whole = Trainer(cfg, Runtime(cfg), x, y)
    for _ in range(2):
        train_one_epoch(whole.step, whole.gen, whole.schedule)
        whole.next_epoch += 1
    part = Trainer(cfg, Runtime(cfg), x, y)
    train_one_epoch(part.step, part.gen, part.schedule)
    part.next_epoch += 1
    state = part.state_dict()
    for g in state["optimizer"]["param_groups"]:  # as a GPU run's optimiser writes them
        g.update(capturable=True, foreach=True, lr=torch.tensor(g["lr"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = Trainer(cfg, Runtime(cfg), x, y)
    again.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
    train_one_epoch(again.step, again.gen, again.schedule)
    for (k, a), b in zip(whole.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


def _data(n: int):
    g = torch.Generator().manual_seed(11)
    return (torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=g),
            torch.randint(0, 7, (n,), generator=g))


def test_determinism_on_a_gpu_sets_cublas_s_workspace_before_cuda_starts_or_refuses():
    """cuBLAS reads its workspace setting once, when it starts: a run that asks for
    determinism gets it set while CUDA has not started, and is refused in one line where it is
    too late or set to a value under which cuBLAS is not deterministic."""
    from pipeline.engine import deterministic_cublas
    from pipeline.errors import ConfigError

    env: dict[str, str] = {}
    deterministic_cublas(env, cuda_started=False)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    deterministic_cublas({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, cuda_started=True)  # set before
    with pytest.raises(ConfigError, match="export CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        deterministic_cublas({}, cuda_started=True)
    with pytest.raises(ConfigError, match="it is ':0:0'"):
        deterministic_cublas({"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, cuda_started=False)


@pytest.mark.gpu
def test_a_cpu_checkpoint_resumes_on_the_gpu_and_its_graph_captures():
    """The other way round: a CPU run's plain Adam state, loaded into the capturable Adam of a
    graphed GPU step, captures and trains an epoch with finite loss."""
    import io

    from pipeline.train import Trainer

    cpu = Config(stage="improved", width=0.25, batch_size=16, epochs=2, augment=True,
                 device="cpu", precision="fp32", seed=3)
    x, y = _data(64)
    part = Trainer(cpu, Runtime(cpu), x, y)
    train_one_epoch(part.step, part.gen, part.schedule)
    part.next_epoch += 1
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    gpu = dataclasses.replace(cpu, device="cuda")
    t = Trainer(gpu, Runtime(gpu), x.cuda(), y.cuda())
    t.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
    out = train_one_epoch(t.step, t.gen, t.schedule)
    assert t.step.graphed and t.step.graph is not None
    assert torch.isfinite(torch.tensor(out["loss"]))
    t.step.release()


@pytest.mark.gpu
def test_a_graphed_step_with_dropout_captures_without_a_warning_and_each_replay_draws_anew():
    """On this torch a capture registers the run's own dropout generator (explicitly before
    2.14, by itself from 2.14, where the explicit call only warns); each replay must move the
    generator on, or every step would drop the same elements."""
    import warnings

    from pipeline.randomness import RunRandom
    from pipeline.engine import build_net

    cfg = Config(stage="improved", width=0.25, batch_size=32, device="cuda", precision="fp32",
                 conv_dropout=0.25, fc_dropout=0.5, augment=True)
    rt = Runtime(cfg)
    rng = RunRandom(0, rt.device)
    model = build_net(cfg, rt, rng)
    x, y = _data(32 * 8)
    step = TrainStep(model, build_optimizer(cfg, model.parameters(), capturable=True), rt,
                     x.cuda(), y.cuda(), Recipe.of(cfg), generators=rng.graphed_generators())
    offsets = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for idx, u in _batches(len(y), 32, 6):
            step(idx.cuda(), u.cuda())
            torch.cuda.synchronize()
            if step.graph is not None:
                offsets.append(rng.dropout.get_offset())
    assert len(offsets) == 6 - TrainStep.WARMUP + 1
    assert all(b > a for a, b in zip(offsets, offsets[1:])), offsets
    step.release()
