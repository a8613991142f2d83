"""Train a LLaDA-architecture masked-diffusion LM on the synthetic tasks (ref-dllm).

Masked diffusion (LLaDA's SFT recipe): the prompt stays clean; each position of the
response (answer, then EOS to the end of the canvas) is masked with probability t ~ U(0, 1)
and the model is trained by cross-entropy to predict the masked tokens. Half the rows are
masked as a semi-autoregressive decoder sees them instead (earlier blocks clean, the current
block masked with probability t, later blocks fully masked) and a third of those hide the
later blocks altogether (diffusers' ``LLaDA2Pipeline`` feeds only the window up to the current
block), so the one model serves every decoding loop the bench compares.

Time-budgeted and resumable: ``--seconds`` is the total budget; a run that finds
``OUT/train_state.pt`` continues from it until the budget is spent. The checkpoint
(``OUT/``: weights in bf16 safetensors, config, tokenizer, card) is rewritten every
``--save-every`` seconds and at the end.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cadence.dllm.tasks import MAX_ANSWER, MAX_PROMPT, TASKS, check_tasks, draw
from cadence.dllm.tokenizer import build_tokenizer

STATE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    size: str = "ref-dllm"
    gen_length: int = 512
    block_length: int = 32
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    seconds: float = 420.0
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)

    def __post_init__(self):
        check_tasks(self.tasks)
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} must be a multiple of block_length={self.block_length}")
        if self.gen_length <= MAX_ANSWER:
            raise ValueError(f"gen_length={self.gen_length} must be > {MAX_ANSWER}: answers take up to "
                             f"{MAX_ANSWER} tokens and an end-of-sequence token")


def make_batch(config: TrainConfig, tokenizer, rng: random.Random, generator: torch.Generator, device):
    """(input_ids, labels, attention_mask) of one batch; labels are -100 where no loss is taken."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    # canvases a quarter, half or all of gen_length: the decoder meets them all in the bench
    gen = rng.choice([length for length in (config.gen_length // 4, config.gen_length // 2, config.gen_length)
                      if length > MAX_ANSWER])
    block = min(config.block_length, gen)
    rows = []
    for _ in range(config.batch):
        _, prompt, answer = draw(rng, config.tasks)
        prompt_ids = [tokenizer.bos_token_id, *encode(prompt)]
        response = encode(answer)[: gen - 1]
        response += [tokenizer.eos_token_id] * (gen - len(response))
        rows.append((prompt_ids, response))
    width = max(len(p) for p, _ in rows) + gen
    input_ids = torch.full((config.batch, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for row, (prompt_ids, response) in enumerate(rows):
        start, clean = len(prompt_ids), torch.tensor(response)
        t = torch.rand((), generator=generator).clamp_min(1e-3)
        masked = torch.rand(gen, generator=generator) < t
        visible = gen
        if torch.rand((), generator=generator) < 0.5:  # as a semi-autoregressive decoder sees it
            current = int(torch.randint(0, gen // block, (), generator=generator)) * block
            masked[:current] = False
            masked[current + block:] = True
            if torch.rand((), generator=generator) < 1 / 3:  # a window ending at the current block
                visible = current + block
        masked[0] |= not masked.any()
        noisy = torch.where(masked, torch.tensor(tokenizer.mask_token_id), clean)
        input_ids[row, :start] = torch.tensor(prompt_ids)
        input_ids[row, start:start + gen] = noisy
        attention[row, :start + visible] = 1
        keep = masked.clone()
        keep[visible:] = False
        labels[row, start:start + gen] = torch.where(keep, clean, torch.tensor(-100))
    return input_ids.to(device), labels.to(device), attention.to(device)


def _lr(config: TrainConfig, step: int, elapsed: float) -> float:
    warm = min(1.0, (step + 1) / config.warmup)
    progress = min(1.0, elapsed / config.seconds)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Weights in bf16 (the 25 MB limit), config and tokenizer, loadable by ``cadence.dllm.load``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to("cpu", torch.bfloat16) for key, value in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)


def train(config: TrainConfig, out: Path, device: str = "cpu", save_every: float = 60.0, log=print,
          state: Path | None = None) -> dict:
    """Train (or resume) into ``out``; the optimizer state (three times the weights, in fp32)
    goes to ``state``, by default ``out/train_state.pt``, elsewhere to keep ``out`` small."""
    from cadence.models.llada import build_llada

    out = Path(out)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    model = build_llada(config.size).to(device)
    if model.config.max_position_embeddings < MAX_PROMPT + 1 + config.gen_length:
        raise ValueError(f"size {config.size!r} has a context of {model.config.max_position_embeddings} tokens; "
                         f"gen_length={config.gen_length} with the longest prompt ({MAX_PROMPT + 1}) does not fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, elapsed, losses = 0, 0.0, []
    state_path = Path(state) if state is not None else out / STATE
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != asdict(config) | {"seconds": state["config"]["seconds"]}:
            raise ValueError(f"{state_path} was written by another configuration: {state['config']}; "
                             "use another --out or the same options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        log(f"resuming at step {step}, {elapsed:.0f} s of {config.seconds:.0f} s spent")
    rng = random.Random(1000 + config.seed + step)  # never seed 0, the evaluation draws
    generator = torch.Generator().manual_seed(1000 + config.seed + step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    model.train()
    started, last_save = time.perf_counter() - elapsed, time.perf_counter()
    while elapsed < config.seconds:
        input_ids, labels, attention = make_batch(config, tokenizer, rng, generator, device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step, elapsed)
        with autocast:
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.perf_counter() - started
        if step % 100 == 0:
            log(f"step {step}  loss {sum(losses[-100:]) / 100:.4f}  {elapsed:.0f}/{config.seconds:.0f} s")
        if time.perf_counter() - last_save > save_every or elapsed >= config.seconds:
            save_checkpoint(model, tokenizer, out)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": elapsed, "losses": losses, "config": asdict(config)}, state_path)
            last_save = time.perf_counter()
    summary = {"config": asdict(config), "steps": step, "seconds": round(elapsed, 1), "device": _device_name(device),
               "torch": torch.__version__, "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4)}
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"
