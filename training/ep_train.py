"""`raymoe train`: expert-parallel training on Ray Train's TorchTrainer, E x D ranks, gloo on CPUs and
NCCL on GPUs (Ray Train sets up the default process group; the code is the same).

Every rank draws the single-process run's random numbers (weights, batch offsets) from the same seed
and keeps its part: its slice of the experts, its rows of the global batch. So any layout trains the
same model as one process (`ep_step` says how the loss and gradients are split), up to float32
rounding; tests/test_ep_train.py checks it. (A model too large to initialise whole on one rank would
seed each expert on its own instead.)

One TorchTrainer launch costs seconds of worker start-up, so a launch runs a list of `Job`s: each on
its own ranks of the worker group, those on disjoint ranks at once, the rest in turn (a layout sweep,
the benchmark, the tests). The leader of each job writes its checkpoint in the HF layout the server
reads, with losses.json and training.json beside it; Ray Train persists the workers' directories and
the driver copies each job's to where it was asked for.
"""

import json
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint.bundled import BUNDLED_MODEL
from checkpoint.writer import save_checkpoint
from training import corpus
from training.bpe import tokenizer_config
from training.ep_layer import ExpertParallelMixtral
from training.ep_step import ep_train_step
from training.process_groups import ExpertParallelGroups, build_groups
from training.train import TrainConfig, make_optimizer, sample_batch, seeded_model, token_stream
from training.trainable import hf_state_dict

# `--tiny`: a few steps in seconds on CPUs.
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, sliding_window=16, seq_len=32,
            max_files=8)


def _hidden(default):
    return field(default=default, metadata={"cli": False})


@dataclass
class EPTrainConfig(TrainConfig):
    """The model, data, optimiser and parallel layout: every flag of `raymoe train`."""

    eval_every: int = _hidden(100)  # no held-out evaluation in this loop
    eval_tokens: int = _hidden(4096)
    vocab_size: int = _hidden(4096)  # the tokenizer's
    dtype: str = field(default="float32", metadata={"help": "of the saved weights (float32: as trained)"})
    ep: int = field(default=1, metadata={"help": "expert-parallel ranks: each holds n_experts / ep experts per layer"})
    dp: int = field(default=1, metadata={"help": "data-parallel copies of the model (world size ep x dp)"})
    capacity_factor: float | None = field(default=None, metadata={
        "help": "slots an expert takes from one rank per layer, as a multiple of an even share; the rest are "
                "dropped and counted (default: no limit)"})
    tiny: bool = field(default=False, metadata={
        "help": "a model that runs a few steps in seconds: dim 32, 2 layers, 32-token windows, 8 files "
                "(replaces those flags)"})
    out: Path = field(default=Path("runs/ep-train"), metadata={
        "help": "checkpoint directory to write, with losses.json and training.json"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per rank, NCCL (default: CPUs, gloo)"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs Ray reserves per rank (default: 1, or the cluster's free CPUs shared out)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per rank"})
    storage_path: str | None = field(default=None, metadata={
        "help": "Ray Train's storage, which every node must reach (default: a temporary directory here)"})
    tokenizer: Path = field(default=BUNDLED_MODEL, metadata={
        "help": "the checkpoint whose tokenizer.json encodes the corpus and is saved with the model"})

    @property
    def world_size(self) -> int:
        return self.ep * self.dp

    def resolved(self) -> "EPTrainConfig":
        """With the --tiny shape applied, checked."""
        cfg = replace(self, **TINY) if self.tiny else self
        if cfg.n_experts % cfg.ep:
            raise ValueError(f"--ep {cfg.ep} does not divide {cfg.n_experts} experts")
        if cfg.batch_size % cfg.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} does not split over {cfg.world_size} ranks")
        return cfg


@dataclass
class Job:
    """One training run on ranks first_rank .. first_rank + ep dp - 1 of a launch's worker group; its
    leader writes to `staged/<name>` there and the driver copies that to `cfg.out`."""

    name: str
    cfg: EPTrainConfig
    first_rank: int = 0

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.cfg.world_size)


def load_tokens(cfg: EPTrainConfig) -> tuple[EPTrainConfig, torch.Tensor, str]:
    """The training files of the corpus (the first max_files) encoded by cfg.tokenizer -> (cfg with its
    vocabulary size, tokens (N,), the tokenizer's JSON)."""
    from tokenizers import Tokenizer

    path = Path(cfg.tokenizer) / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    files = corpus.split(corpus.stdlib_files())[0][: cfg.max_files or None]
    data = token_stream(tok, list(corpus.read_texts(files).values()))
    return replace(cfg, vocab_size=tok.get_vocab_size()), data, path.read_text()


# --- on every rank ---------------------------------------------------------------------------------------


def run_job(job: Job, data: torch.Tensor, device: torch.device, out: Path, tokenizer_json: str | None) -> bool:
    """Train `job` on this rank; the leader writes the checkpoint to `out` (-> True)."""
    cfg = job.cfg
    groups = build_groups(cfg.ep, cfg.dp, job.first_rank)
    full, gen = seeded_model(cfg)  # the whole model, as one process draws it; each rank keeps its part
    model = ExpertParallelMixtral(full, groups, cfg.capacity_factor).to(device)
    del full
    opt = make_optimizer(model, cfg)
    history: dict[str, list] = {"loss": [], "ce": [], "aux": [], "grad_norm": [], "dropped": []}
    step_s, exchange_s = [], []
    for step in range(cfg.steps):
        batch = sample_batch(data, cfg, gen)
        t, ex = time.perf_counter(), model.timer.seconds
        r = ep_train_step(model, opt, batch, cfg, step)
        step_s.append(time.perf_counter() - t)
        exchange_s.append(model.timer.seconds - ex)
        for k, v in asdict(r).items():
            history[k].append(v)

    timing = mean_timing(step_s, exchange_s, cfg, groups, device)
    if groups.dp_rank != 0:
        return False
    w13, w2 = model.gather_experts()  # every rank of copy 0 takes part; the leader writes
    if groups.is_leader:
        save(out, model, w13, w2, cfg, history, timing, tokenizer_json)
    return groups.is_leader


def mean_timing(step_s: list[float], exchange_s: list[float], cfg: EPTrainConfig, groups: ExpertParallelGroups,
                device: torch.device) -> dict:
    """Step time, tokens/s per rank and the all-to-all's share, over the steps after the first (it pays
    for warm-up), averaged over the ranks (every rank of the run calls it)."""
    timed = slice(1, None) if len(step_s) > 1 else slice(None)
    sums = torch.tensor([sum(step_s[timed]), sum(exchange_s[timed])], dtype=torch.float64, device=device)
    dist.all_reduce(sums, group=groups.dense_grads)
    mean_step = sums[0].item() / groups.world_size / len(step_s[timed])
    tokens_per_rank = cfg.batch_size // groups.world_size * cfg.seq_len
    return {"step_seconds": mean_step, "tokens_per_second_per_rank": tokens_per_rank / mean_step,
            "all_to_all_share": sums[1].item() / sums[0].item()}


def save(out: Path, model: ExpertParallelMixtral, w13: torch.Tensor, w2: torch.Tensor, cfg: EPTrainConfig,
         history: dict, timing: dict, tokenizer_json: str | None) -> None:
    """The checkpoint in HF layout (all experts: w13 (L, E, 2I, D), w2 (L, E, D, I)), losses.json, training.json."""
    a, groups = model.args, model.groups
    save_checkpoint(out, a, hf_state_dict(model.core.cpu(), w13.cpu(), w2.cpu()), cfg.dtype, cfg.aux_loss_coef)
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
        (out / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(a.max_position_embeddings), indent=2) + "\n")
    (out / "losses.json").write_text(json.dumps(history["loss"]) + "\n")
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "layout": {"ep": cfg.ep, "dp": cfg.dp, "experts_per_rank": model.w13.shape[1],
                          "backend": dist.get_backend(), "device": str(model.w13.device),
                          "leader_groups": {name: dist.get_process_group_ranks(getattr(groups, name))
                                            for name in ("token_exchange", "expert_grads", "dense_grads")}},
               "history": history, **timing, "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: run the jobs this rank belongs to, in order, then report once."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    rank = dist.get_rank()
    staged = Path(tempfile.mkdtemp(prefix="raymoe-ep-train-"))
    wrote = False
    for job in config["jobs"]:
        if rank in job.ranks:
            wrote |= run_job(job, config["data"], device, staged / job.name, config["tokenizer_json"])
    # Every worker reports once; Ray Train merges the directories of those that wrote into one checkpoint.
    ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(staged) if wrote else None)
    shutil.rmtree(staged, ignore_errors=True)


# --- the driver ------------------------------------------------------------------------------------------


def default_cpus_per_worker(workers: int) -> float:
    """1, or the cluster's free CPUs shared out (4 ranks fit on 2 cores at 0.5 each)."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    return max(0.01, min(1.0, math.floor(100 * free / workers) / 100))


def fit(jobs: list[Job], data: torch.Tensor, tokenizer_json: str | None = None, *, use_gpu: bool = False,
        cpus_per_worker: float | None = None, threads: int = 1, storage_path: str | None = None) -> None:
    """Run `jobs` in one TorchTrainer launch on as many workers as the widest needs; each job's checkpoint
    ends in its cfg.out. Needs Ray (started or joined by the caller)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = max(job.ranks.stop for job in jobs)
    if len({job.name for job in jobs}) != len(jobs):
        raise ValueError("job names must differ")
    cpus = cpus_per_worker or default_cpus_per_worker(workers)
    resources = {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus}
    with tempfile.TemporaryDirectory(prefix="raymoe-ray-train-") as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"jobs": jobs, "data": data, "tokenizer_json": tokenizer_json, "threads": threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=f"raymoe-ep-{uuid.uuid4().hex[:8]}", storage_path=storage_path or tmp))
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as d:
            for job in jobs:
                shutil.copytree(Path(d) / job.name, job.cfg.out, dirs_exist_ok=True)


def main(cfg: EPTrainConfig) -> int:
    """`raymoe train`: tokenize the corpus, train on Ray (started or joined by the caller), print a summary."""
    cfg = cfg.resolved()
    cfg, data, tokenizer_json = load_tokens(cfg)
    t = time.perf_counter()
    fit([Job("model", cfg)], data, tokenizer_json, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
        threads=cfg.threads, storage_path=cfg.storage_path)
    s = json.loads((Path(cfg.out) / "training.json").read_text())
    losses = s["history"]["loss"]
    print(f"trained {cfg.steps} steps on {cfg.ep}x{cfg.dp} ranks ({s['layout']['backend']}) in "
          f"{time.perf_counter() - t:.1f}s: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{s['tokens_per_second_per_rank']:.0f} tokens/s per rank, all-to-all {100 * s['all_to_all_share']:.0f}% "
          f"of step time, {sum(map(sum, s['history']['dropped']))} slots dropped; saved to {cfg.out}")
    return 0
