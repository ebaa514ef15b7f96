"""Training-step cost of RobustDLRT against dense fine-tuning: torchvision VGG16 at 32×32.

Dense, low-rank (``factorize_``'s policy, init 150, r_max 200) and low-rank at the reference's ranks
(every conv but the first and linear but the last, channel ranks min(C/2, 200): docs/peers.md's 0.49 s
step) each train one epoch of the same digits batches by ``Trainer`` (AdamW 5e-4, cosine, clip 1.0; β
0.075, τ 0.1, s* 10), one process per model, batch by batch in turn. Targets: epoch low-rank / dense ≤
0.2; augment + truncate ≤ 10 % of the epoch; the step at the reference's ranks ≥ 1.5× faster than 0.49 s,
raw and scaled by a dense step both measured (``plain_adamw_step_ratio``).

    python bench/bench_dlrt.py               # VGG16, 40 batches of 32 (≈ an epoch of digits)
    python bench/bench_dlrt.py --smoke       # ResNet-18, ranks ≤ 16, 4 batches, s* 3: seconds (CI)
    python bench/bench_dlrt.py --profile 4   # also profile a cycle of 4 steps of each low-rank model
    python bench/bench_dlrt.py --device cuda # bf16 autocast, synchronized time stamps (section "dlrt-gpu")
"""

from __future__ import annotations

import copy
import os
import platform
import queue
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from harness import lib
from harness.measure import sync
from harness.run import Run, add_run_options, check_run_options, options, parse_device, parser
from torch import nn

REFERENCE_STEP_S = 0.49  # authors' RobustDLRT step, VGG16, batch 32, median (docs/peers.md)
REFERENCE_DENSE_STEP_S = 2.28  # dense VGG16 step, batch 32, AdamW, median (docs/peers.md)


def digits_batches(
    n_batches: int, batch_size: int, size: int = 32, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    need = n_batches * batch_size
    perm = perm.repeat(need // len(perm) + 1)[:need]
    return [(x[perm[i : i + batch_size]], y[perm[i : i + batch_size]]) for i in range(0, need, batch_size)]


def factorize_like_reference(model: nn.Module, init_rank: int, r_max: int) -> int:
    """The reference's layer choice and ranks: all convs but the first and all linears but the
    last; conv channel ranks capped at min(C/2, r_max) and started at the cap; linears start at
    ``init_rank`` with cap r_max. Returns the number of factorized layers."""
    modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    skip = {convs[0], candidates[-1][0]}
    count = 0
    for name, m in candidates:
        if name in skip:
            continue
        if isinstance(m, nn.Conv2d):
            cap_out, cap_in = min(m.out_channels // 2, r_max), min(m.in_channels // 2, r_max)
            new = lib.TuckerConv2d.from_dense(m, rank=(cap_out, cap_in), r_min=2, r_max=r_max)
            new.r_max_out, new.r_max_in = cap_out, cap_in  # the reference's per-mode caps
            new.r_max = max(cap_out, cap_in)
        else:
            new = lib.LowRankLinear.from_dense(m, rank=min(init_rank, r_max), r_min=2, r_max=r_max)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
        count += 1
    return count


# One process per model, not one thread: torch's OpenMP pool belongs to the thread that calls it,
# and with more pool threads than cores libgomp stops spin-waiting between parallel regions, so
# every op pays a futex wake-up (the low-rank models' many small ops most), which no single-model
# run pays. In its own process each model has one pool, as in a real run.


class Baton:
    """Round-robin turns between processes: exactly one model computes at any time."""

    def __init__(self, n: int, ctx) -> None:
        self.cond = ctx.Condition()
        self.turn = ctx.Value("i", 0, lock=False)  # guarded by cond
        self.done = ctx.Array("b", n, lock=False)
        self.n = n

    def wait(self, k: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn.value == k)

    def wait_all(self) -> None:
        """Until every model has finished (its process then ends without disturbing a timed step)."""
        with self.cond:
            self.cond.wait_for(lambda: self.turn.value == -1)

    def pass_on(self, k: int, finished: bool = False) -> None:
        """Hand the turn on if ``k`` holds it; ``finished``: ``k`` takes no more turns (also out
        of turn, when its process failed)."""
        with self.cond:
            self.done[k] = self.done[k] or finished
            if all(self.done):
                self.turn.value = -1
            elif self.turn.value == k:
                j = (k + 1) % self.n
                while self.done[j]:
                    j = (j + 1) % self.n
                self.turn.value = j
            self.cond.notify_all()


class BatonLoader:
    """A model's loader: waits for its turn, hands over a batch, and times the trainer's step
    (from the hand-over to the next request). Keeps the turn after its last batch: the process
    passes it on once ``fit`` has returned (end-of-epoch bookkeeping is not timed in parallel)."""

    def __init__(self, batches, baton: Baton, k: int, model: nn.Module, device: torch.device):
        self.batches, self.baton, self.k, self.model = batches, baton, k, model
        self.sync = lambda: sync(device)  # CUDA runs asynchronously
        self.seconds: list[float] = []
        self.ranks: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            self.baton.wait(self.k)
            self.ranks.append(_mean_rank(self.model))
            self.sync()
            t = time.perf_counter()
            yield batch
            self.sync()
            self.seconds.append(time.perf_counter() - t)
            if i < len(self.batches) - 1:
                self.baton.pass_on(self.k)


def _mean_rank(model: nn.Module) -> float:
    ranks = [r for layer in lib.low_rank_layers(model).values() for r in layer.ranks]
    return sum(ranks) / len(ranks) if ranks else float("nan")


MODELS = ("dense", "lowrank", "lowrank_reference_ranks")
NO_EPOCH = lambda loader, epoch: None  # fixed batches: no sampler to seed


def train_section(args, s_star: int | None, amp: str):
    """The bench's optimizer (the reference script's AdamW, cosine, clip); ``s_star``: a RobustDLRT
    section with that cycle length, None: a dense one."""
    common = dict(optimizer="adamw", lr=args.lr, schedule="cosine", grad_clip=args.clip, amp=amp, checkpoint_every=0)
    if s_star is None:
        return lib.BaselineSection(epochs=1, **common)
    return lib.TrainSection(epochs=1, beta=args.beta, tau=args.tau, coefficient_steps=s_star, **common)


def build_model(name: str, args) -> tuple[nn.Module, float, int]:
    """The bench's models from one seed: (model, factorize_ seconds, factorized layers)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=10)
    t = time.perf_counter()
    if name == "lowrank":
        count = len(lib.factorize_(model, init_rank=args.init_rank, r_max=args.r_max, r_min=2).factorized)
    elif name == "lowrank_reference_ranks":
        count = factorize_like_reference(model, args.init_rank, args.r_max)
    else:
        count = 0
    return model, time.perf_counter() - t, count


def train_in_turn(k: int, name: str, args, baton: Baton, results) -> None:
    """A child process: build model ``name`` and warm it up in its turn, train it one epoch in
    turn with the others, then (all done) put the raw figures or the error on ``results``."""
    figures: dict = {}
    try:
        lib.enable_huge_pages()
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        cfg = train_section(args, None if name == "dense" else args.s_star, args.amp)
        batches = digits_batches(args.batches, args.batch_size)
        baton.wait(k)  # set-up in turn too, so that factorize_ times are not shared
        try:
            model, seconds, count = build_model(name, args)
            model.to(device)
            # Warm-up, untimed: a 2-batch epoch (an augmentation and a truncation) of a copy, so
            # that oneDNN's kernels for these shapes are built and the allocator has its pages,
            # as in any epoch of a real run but its first
            lib.Trainer(copy.deepcopy(model), batches[:2], cfg, set_epoch=NO_EPOCH, device=device).fit()
        finally:
            baton.pass_on(k)
        loader = BatonLoader(batches, baton, k, model, device)
        trainer = lib.Trainer(model, loader, cfg, set_epoch=NO_EPOCH, name=name, device=device)
        trainer.fit()
        figures = dict(seconds=loader.seconds, ranks=loader.ranks, record=trainer.history.epochs[0])
        figures.update(nonfinite_steps=trainer.history.nonfinite_steps, layers=len(trainer.layers))
        figures["final_ranks"] = {n: list(layer.ranks) for n, layer in trainer.layers.items()}
        figures.update(factorize_seconds=seconds, factorized_layers=count)
    except BaseException:  # re-raised by the parent
        import traceback

        figures = {"error": traceback.format_exc()}
    finally:
        baton.pass_on(k, finished=True)
        baton.wait_all()  # freeing a model's memory would slow the others' last steps
        results.put((k, figures))


def run_lockstep(args) -> dict[str, dict]:
    """Train the three models one epoch each, one process per model, batch by batch in turn."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited OpenMP pool or CUDA context
    baton, results = Baton(len(MODELS), ctx), ctx.Queue()
    procs = [
        ctx.Process(target=train_in_turn, args=(k, name, args, baton, results), daemon=True)
        for k, name in enumerate(MODELS)
    ]
    for p in procs:
        p.start()
    raw: dict[int, dict] = {}
    while len(raw) < len(MODELS):
        try:
            k, figures = results.get(timeout=5)
        except queue.Empty:  # a child that died without a word (killed, out of memory) ends the run
            dead = [MODELS[i] for i, p in enumerate(procs) if i not in raw and not p.is_alive()]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"bench_dlrt: the {', '.join(dead)} process died (exit codes {[p.exitcode for p in procs]})"
                ) from None
            continue
        raw[k] = figures
    for p in procs:
        p.join()
    errors = [f"{MODELS[k]}:\n{r['error']}" for k, r in sorted(raw.items()) if "error" in r]
    if errors:
        raise RuntimeError("bench_dlrt: a training process failed\n" + "\n".join(errors))
    return {MODELS[k]: r for k, r in raw.items()}


def summarize(raw: dict, s_star: int, dense_epoch: float) -> dict:
    seconds, record = raw["seconds"], raw["record"]
    n = len(seconds)
    kinds = [
        "augment" if i % s_star == 0 else "truncate" if (i % s_star == s_star - 1 or i == n - 1) else "coefficient"
        for i in range(n)
    ]
    by = {k: [s for s, kk in zip(seconds, kinds) if kk == k] for k in ("augment", "coefficient", "truncate")}
    epoch = sum(seconds)
    n_aug, n_trunc = kinds.count("augment"), kinds.count("truncate")
    med = {k: statistics.median(v) if v else float("nan") for k, v in by.items()}
    aug_op, trunc_op = record["seconds_augment"], record["seconds_truncate"]
    # the augmentation batch also back-propagates to the bases (∂L/∂U, ∂L/∂V): its extra time
    aug_extra = max(0.0, med["augment"] - aug_op / max(1, n_aug) - med["coefficient"]) if by["augment"] else 0.0
    out = {k: raw[k] for k in ("layers", "factorized_layers", "factorize_seconds")}
    out.update(params=record["params"], compression_rate=record["compression_rate"])
    out.update(step_median=statistics.median(seconds), coefficient_step_median=med["coefficient"])
    out.update(augment_step_median=med["augment"], truncate_step_median=med["truncate"])
    out.update(augment_op_seconds_mean=aug_op / max(1, n_aug), truncate_op_seconds_mean=trunc_op / max(1, n_trunc))
    out.update(epoch_seconds=epoch, epoch_ratio_vs_dense=epoch / dense_epoch)
    out["augment_truncate_share"] = (aug_op + trunc_op) / epoch
    out["augment_truncate_share_with_basis_backward"] = (aug_op + trunc_op + n_aug * aug_extra) / epoch
    out.update(speedup_vs_reference_step=REFERENCE_STEP_S / out["step_median"], mean_rank_per_step=raw["ranks"])
    out.update(final_ranks=raw["final_ranks"], step_seconds=seconds, step_kinds=kinds)
    return out | {"train_loss": record["train_loss"], "nonfinite_steps": raw["nonfinite_steps"]}


def plain_adamw_step_ratio(model: nn.Module, batches, n_steps: int, lr: float, clip: float) -> dict:
    """Dense step with torch's default AdamW (on the CPU its per-parameter loop: what a plain
    training script gets) over the step with the fused AdamW our trainer uses, on two copies of
    the same model, alternating.

    docs/peers.md's dense step (2.28 s) is the reference's plain loop; ours is faster by the fused
    optimizer alone (VGG16's 134M parameters), so scaling by it would not measure the machine.
    """
    copies = {"fused": copy.deepcopy(model), "plain": copy.deepcopy(model)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, fused=(k == "fused") or None) for k, m in copies.items()}
    seconds: dict[str, list[float]] = {k: [] for k in copies}
    for i in range(n_steps + 1):  # the first round warms up
        x, y = batches[i % len(batches)]
        for k, m in copies.items():
            t = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opts[k].step()
            if i:
                seconds[k].append(time.perf_counter() - t)
    fused, plain = (statistics.median(v) for v in seconds.values())
    return dict(fused_step_median=fused, plain_step_median=plain, plain_over_fused=plain / fused, steps=n_steps)


def measure(args) -> dict:
    device = torch.device(args.device)
    plain = None  # the normalization is against docs/peers.md's CPU steps: meaningless for a GPU run
    if device.type == "cpu":
        model, batches = build_model("dense", args)[0], digits_batches(2, args.batch_size)
        plain = plain_adamw_step_ratio(model, batches, args.norm_steps, args.lr, args.clip)
    raw = run_lockstep(args)
    secs = raw["dense"]["seconds"]
    dense = dict(step_median=statistics.median(secs), epoch_seconds=sum(secs), params=raw["dense"]["record"]["params"])
    out = {"dense": dense | {"step_seconds": secs}}
    out.update({k: summarize(raw[k], args.s_star, dense["epoch_seconds"]) for k in MODELS[1:]})
    # The machine is shared and its speed drifts over a day: scale our times by docs/peers.md's
    # dense step over a dense step here with the same (plain) optimizer, our dense step × plain/fused.
    out["plain_adamw"] = plain
    if plain is None:
        return out
    plain_dense = out["dense"]["step_median"] * plain["plain_over_fused"]
    out["dense"]["plain_adamw_step_estimate"] = plain_dense
    scale = REFERENCE_DENSE_STEP_S / plain_dense
    for key in ("lowrank", "lowrank_reference_ranks"):
        out[key]["step_median_load_normalized"] = out[key]["step_median"] * scale
        out[key]["speedup_vs_reference_step_load_normalized"] = REFERENCE_STEP_S / (out[key]["step_median"] * scale)
    return out


def profile_cycle(args, n_steps: int) -> str:
    """torch.profiler over one DLRT cycle (augment, coefficient steps, truncate) of each low-rank model."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for name in ("lowrank", "lowrank_reference_ranks"):
        model = build_model(name, args)[0]
        batches = digits_batches(n_steps, args.batch_size)
        trainer = lib.Trainer(model, batches, train_section(args, n_steps, "off"), set_epoch=NO_EPOCH)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.fit()
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=36, max_shapes_column_width=70
        )
        tables.append(f"### {name}: {n_steps} steps\n{table}")
    return "\n".join(tables)


def markdown(res: dict, args, load_before, load_after) -> str:
    d, a, b, p = res["dense"], res["lowrank"], res["lowrank_reference_ranks"], res["plain_adamw"]
    ok = lambda c: "✅" if c else "❌"
    s = lambda x: f"{x:.3f} s"

    where = (
        f"{args.threads} thread(s)"
        if p is not None
        else f"{args.device}{', bf16 autocast' if args.amp == 'bf16' else ''}"
    )
    lines = [
        f"## RobustDLRT vs dense fine-tuning: {args.model}, 32×32 digits, batch {args.batch_size}, "
        f"{args.batches} batches, AdamW, {where}",
        "",
        f"| | dense | low-rank (ours: policy, init {args.init_rank}, r_max {args.r_max}) | "
        f"low-rank at the reference's ranks (min(C/2, {args.r_max})) |",
        "|---|---|---|---|",
        f"| factorized layers, factorize_ time | — | {a['factorized_layers']}, {a['factorize_seconds']:.1f} s | "
        f"{b['factorized_layers']}, {b['factorize_seconds']:.1f} s |",
        f"| params (c.r.) | {d['params']:,} | {a['params']:,} ({a['compression_rate']:.1f} %) | "
        f"{b['params']:,} ({b['compression_rate']:.1f} %) |",
        f"| step, median | {s(d['step_median'])} | {s(a['step_median'])} | {s(b['step_median'])} |",
        f"| coefficient step, median | — | {s(a['coefficient_step_median'])} | {s(b['coefficient_step_median'])} |",
        f"| augmentation step, median (of which the augmentation: QRs, state map) | — | {s(a['augment_step_median'])} "
        f"({s(a['augment_op_seconds_mean'])}) | {s(b['augment_step_median'])} ({s(b['augment_op_seconds_mean'])}) |",
        f"| truncation step, median (of which the truncation: SVDs, re-orthonormalization, state map) | — | "
        f"{s(a['truncate_step_median'])} "
        f"({s(a['truncate_op_seconds_mean'])}) | {s(b['truncate_step_median'])} ({s(b['truncate_op_seconds_mean'])}) |",
        f"| epoch ({args.batches} batches) | {d['epoch_seconds']:.1f} s | {a['epoch_seconds']:.1f} s | "
        f"{b['epoch_seconds']:.1f} s |",
        f"| epoch ratio low-rank / dense (target ≤ 0.2) | — | {a['epoch_ratio_vs_dense']:.3f} "
        f"{ok(a['epoch_ratio_vs_dense'] <= 0.2)} | {b['epoch_ratio_vs_dense']:.3f} "
        f"{ok(b['epoch_ratio_vs_dense'] <= 0.2)} |",
        f"| augment + truncate share of the epoch (target ≤ 10 %; with the bases' backward) | — | "
        f"{100 * a['augment_truncate_share']:.1f} % ({100 * a['augment_truncate_share_with_basis_backward']:.1f} %) "
        f"{ok(a['augment_truncate_share'] <= 0.1)} | {100 * b['augment_truncate_share']:.1f} % "
        f"({100 * b['augment_truncate_share_with_basis_backward']:.1f} %) {ok(b['augment_truncate_share'] <= 0.1)} |",
    ]
    if p is None:  # a GPU run: docs/peers.md's reference figures are CPU steps
        lines += [
            "",
            f"Our step at the reference's ranks: {s(b['step_median'])} ({args.device}; the reference's "
            f"{REFERENCE_STEP_S} s is a CPU step, docs/peers.md). Load average before / after: {load_before} / "
            f"{load_after}. Every time stamp follows a device synchronize.",
        ]
        return "\n".join(lines)
    lines += [
        f"| reference step 0.49 s / our median step (target ≥ 1.5× at equal ranks) | — | "
        f"{a['speedup_vs_reference_step']:.2f}× | {b['speedup_vs_reference_step']:.2f}× "
        f"{ok(b['speedup_vs_reference_step'] >= 1.5)} |",
        f"| same, our times scaled by {REFERENCE_DENSE_STEP_S} s / a plain-AdamW dense step here "
        f"({s(d['plain_adamw_step_estimate'])}; machine-normalized) | — | "
        f"{a['speedup_vs_reference_step_load_normalized']:.2f}× | "
        f"{b['speedup_vs_reference_step_load_normalized']:.2f}× "
        f"{ok(b['speedup_vs_reference_step_load_normalized'] >= 1.5)} |",
        "",
        f"Load average before / after: {load_before} / {load_after} on {os.cpu_count()} cores. Each model trains "
        "in its own process (one OpenMP pool, as in a real run), built and warmed up (an untimed 2-batch epoch of "
        "a copy) in turn before the timed epoch; the first timed step still allocates the optimizer state. The "
        "machine is shared and its speed drifts: interleaving shares its noise between the models (ratios), "
        "but absolute "
        "times are comparable with docs/peers.md's only through a step both measured, the dense one. Our dense "
        "trainer uses fused AdamW; docs/peers.md's 2.28 s is the reference's plain loop (torch's default AdamW), "
        "so the normalized row "
        f"scales by our dense step × {p['plain_over_fused']:.2f} (torch's default AdamW over fused, "
        f"{p['steps']} alternating steps each on copies of the dense model: {s(p['plain_step_median'])} / "
        f"{s(p['fused_step_median'])}), assuming the slowdown is uniform.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()  # as the compress command does, before the first tensor
    ap = parser(__doc__)
    options(ap, model="vgg16", batches=40, batch_size=32, init_rank=150, r_max=200, beta=0.075, tau=0.1, s_star=10)
    options(ap, lr=5e-4, clip=1.0, norm_steps=(10, "dense steps with plain and fused AdamW (normalized row)"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the issue's GPU run, section dlrt-gpu")
    ap.add_argument("--amp", choices=("off", "bf16"), default=None, help="autocast (default: off on CPU, bf16 on CUDA)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile a cycle of N steps (CPU)")
    smoke = "ResNet-18, ranks ≤ 16, 4 batches of 16, s* 3 (seconds; CI)"
    # the torch threads of each model's process (default: torch's, one per core)
    add_run_options(ap, "dlrt", smoke=smoke, threads=torch.get_num_threads())
    args = ap.parse_args(argv)
    device = parse_device(ap, args.device)
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "off"
    if args.profile and device.type != "cpu":
        ap.error("--profile profiles the CPU run; drop it with --device cuda")
    gpu = device.type == "cuda"
    if args.smoke:
        args.model, args.batches, args.batch_size, args.init_rank, args.r_max, args.s_star = "resnet18", 4, 16, 8, 16, 3
        args.norm_steps = 1
    stem = "dlrt-gpu" if gpu else "dlrt"
    check_run_options(ap, args, stem)
    run = Run(__file__, args, argv)

    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    res = measure(args)
    load_after = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "benchmarks_md")},
        "results": res,
        "targets": {"epoch_ratio_vs_dense": 0.2, "augment_truncate_share": 0.10, "speedup_vs_reference_step": 1.5},
        "reference": {
            "step_s": REFERENCE_STEP_S,
            "dense_step_s": REFERENCE_DENSE_STEP_S,
            "source": "shared/docs/peers.md",
        },
    }
    payload.update(torch=torch.__version__, threads=args.threads, device=str(device))
    payload.update(gpu=torch.cuda.get_device_name(device) if gpu else None, cpu_count=os.cpu_count())
    payload.update(machine=platform.machine(), loadavg_before=load_before, loadavg_after=load_after)
    payload["wall_seconds"] = time.perf_counter() - t0
    table = markdown(res, args, load_before, load_after)
    shown = table
    if args.profile:
        payload["profile"] = profile_cycle(args, args.profile)
        shown += "\n```\n" + payload["profile"] + "\n```"
    run.publish(
        stem,
        payload,
        shown,
        body=table,
        measured=f"seconds per training step and per epoch of {args.batches} batches, dense vs RobustDLRT, the three "
        f"models interleaved batch by batch on the same real batches (digits), one process per model, on {device}"
        f"{' with bf16 autocast' if args.amp == 'bf16' else ''}.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
