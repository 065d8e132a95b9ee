"""`raymoe train-tiny`: train the bundled tiny Mixtral on the standard library's Python and export it.

Reproducible: the file list is sorted, the tokenizer is deterministic, and every random draw (weights,
batch offsets) comes from generators seeded with --seed; the step count is fixed, never time-based.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint.args import ModelArgs
from checkpoint.bundled import BUNDLED_MODEL
from checkpoint.writer import save_checkpoint
from training import corpus
from training.bpe import BOS_ID, EOS_ID, tokenizer_config, train_bpe
from training.evaluate import held_out_bits_per_byte
from training.trainable import TrainableMixtral, load_balancing_loss

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # gradients are clipped to this global L2 norm


@dataclass
class TrainConfig:
    """The tiny model's shape, data and optimiser; every flag of `raymoe train-tiny`."""

    seed: int = 0
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.02
    eval_every: int = 100
    eval_tokens: int = 4096
    max_files: int | None = None  # first N training files only (quick runs)
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    n_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 256
    sliding_window: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    dtype: str = "bfloat16"  # of the saved weights; training is float32

    def model_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         head_dim=self.dim // self.n_heads, hidden_dim=self.hidden_dim, n_experts=self.n_experts,
                         top_k=self.top_k, vocab_size=self.vocab_size, rope_theta=self.rope_theta,
                         sliding_window=self.sliding_window, max_position_embeddings=self.max_position_embeddings,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """Every file as <s> ... </s>, concatenated: (N,) int64."""
    ids = []
    for enc in tok.encode_batch(texts):  # the post-processor already put <s> first
        ids += enc.ids + [EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: TrainableMixtral, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def losses(model: TrainableMixtral, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """batch (B, T + 1) -> (next-token cross-entropy, aux loss averaged over layers)."""
    logits, gates = model(batch[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    aux = sum(load_balancing_loss([g], model.args.top_k) for g in gates) / len(gates)
    return ce, aux


def seeded_model(cfg: TrainConfig) -> tuple[TrainableMixtral, torch.Generator]:
    """The model as cfg.seed initialises it, and the generator that then draws the batches. Every trainer
    (single-process, expert-parallel, the tests' reference) draws in this order, so that they match exactly."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = TrainableMixtral(cfg.model_args())
    model.init_weights(gen)
    return model, gen


def sample_batch(data: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len + 1) windows of the token stream at random offsets drawn from gen."""
    T = cfg.seq_len
    starts = torch.randint(0, len(data) - T - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([data[s : s + T + 1] for s in starts.tolist()])


def train_step(model: TrainableMixtral, opt: torch.optim.Optimizer, batch: torch.Tensor, cfg: TrainConfig,
               step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on batch (B, T + 1) -> (cross-entropy, aux loss, gradient norm before clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    ce, aux = losses(model, batch)
    opt.zero_grad(set_to_none=True)
    (ce + cfg.aux_loss_coef * aux).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    return ce, aux, norm


@torch.no_grad()
def eval_loss(model: TrainableMixtral, windows: torch.Tensor) -> float:
    model.eval()
    ce = sum(losses(model, windows[i : i + 8])[0].item() * len(windows[i : i + 8])
             for i in range(0, len(windows), 8))
    model.train()
    return ce / len(windows)


def train(cfg: TrainConfig, out: Path) -> dict:
    """Train, export to `out` in HF layout, and return a summary."""
    t0 = time.perf_counter()
    train_files, val_files = corpus.split(corpus.stdlib_files())
    train_files = train_files[: cfg.max_files] if cfg.max_files else train_files
    train_texts = list(corpus.read_texts(train_files).values())
    tok = train_bpe(train_texts, cfg.vocab_size)
    if tok.get_vocab_size() != cfg.vocab_size:  # a tiny corpus runs out of merges
        cfg.vocab_size = tok.get_vocab_size()
    data = token_stream(tok, train_texts)
    val = token_stream(tok, list(corpus.read_texts(val_files).values()))
    T = cfg.seq_len
    n_val = max(1, min(cfg.eval_tokens, len(val) - 1) // T)
    val_windows = torch.stack([val[i * T : i * T + T + 1] for i in range(n_val)])
    log.info("corpus: %d training files, %d tokens; %d held-out files, %d tokens (%d in the loss-curve eval)",
             len(train_files), len(data), len(val_files), len(val), n_val * T)

    model, gen = seeded_model(cfg)
    opt = make_optimizer(model, cfg)
    history = {"step": [], "train_ce": [], "aux": [], "eval_step": [], "val_ce": []}
    bar = tqdm(range(cfg.steps), desc="train-tiny", unit="step")
    for step in bar:
        ce, aux, _ = train_step(model, opt, sample_batch(data, cfg, gen), cfg, step)
        history["step"].append(step)
        history["train_ce"].append(ce.item())
        history["aux"].append(aux.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["eval_step"].append(step)
            history["val_ce"].append(eval_loss(model, val_windows))
            bar.set_postfix(ce=f"{ce.item():.3f}", val=f"{history['val_ce'][-1]:.3f}", aux=f"{aux.item():.3f}")
    train_s = time.perf_counter() - t0

    export(model, tok, cfg, out)
    plot_losses(history, cfg, out / "loss_curve.png")
    summary = {"config": asdict(cfg), "train_files": len(train_files), "train_tokens": len(data),
               "held_out_files": val_files, "tokens_seen": cfg.steps * cfg.batch_size * T,
               "final_train_ce": sum(history["train_ce"][-20:]) / len(history["train_ce"][-20:]),
               "final_val_ce": history["val_ce"][-1], "train_seconds": round(train_s, 1),
               "torch": torch.__version__, "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def export(model: TrainableMixtral, tok, cfg: TrainConfig, out: Path) -> None:
    a = model.args
    save_checkpoint(out, a, model.hf_state_dict(), cfg.dtype, cfg.aux_loss_coef)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(a.max_position_embeddings), indent=2) + "\n")


def plot_losses(history: dict, cfg: TrainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = cfg.batch_size * cfg.seq_len
    k = max(1, len(history["train_ce"]) // 50)  # running mean over ~2% of the run
    ce = torch.tensor(history["train_ce"])
    smooth = ce.unfold(0, k, 1).mean(1) if len(ce) >= k else ce
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(s + k) * per_step / 1e6 for s in range(len(smooth))], smooth.tolist(), label="train (running mean)")
    ax.plot([(s + 1) * per_step / 1e6 for s in history["eval_step"]], history["val_ce"], "o-",
            label="held-out stdlib files")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"tiny Mixtral: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_experts} experts top-{cfg.top_k}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(cfg: TrainConfig, out: Path = BUNDLED_MODEL, threads: int = 1) -> int:
    """`raymoe train-tiny`: train, export, score the held-out files, print a summary.

    threads: torch CPU threads (one wastes least on a busy machine; results may differ with more).
    """
    torch.set_num_threads(threads)
    s = train(cfg, out)
    bpb = held_out_bits_per_byte(out)
    s["held_out_bits_per_byte"] = bpb
    (out / "training.json").write_text(json.dumps(s, indent=1) + "\n")
    print(f"trained {cfg.steps} steps ({s['tokens_seen'] / 1e6:.1f}M tokens) in {s['train_seconds'] / 60:.1f} min; "
          f"held-out cross-entropy {s['final_val_ce']:.3f} nats/token, {bpb:.3f} bits/byte; saved to {out}")
    return 0
