"""Train a LLaDA-architecture masked-diffusion LM on the synthetic tasks (ref-dllm).

Masked diffusion (LLaDA's SFT recipe): the prompt stays clean; each position of the
response (answer, then EOS to the end of the canvas) is masked with probability t ~ U(0, 1)
and the model is trained by cross-entropy to predict the masked tokens. Half the rows are
masked as a semi-autoregressive decoder sees them instead (earlier blocks clean, the current
block masked with probability t, later blocks fully masked) and a third of those hide the
later blocks altogether (diffusers' ``LLaDA2Pipeline`` feeds only the window up to the current
block), so the one model serves every decoding loop the bench compares.

Answers take at most ``MAX_ANSWER`` tokens of canvases of 128 to 512, so nearly every masked
position is tail EOS. Averaged over all of them (LLaDA's plain SFT loss) the loss reaches 0.03
while the answers stay wrong (measured: 450 s on an H200 gave 4 % exact match, the right length
and format with the wrong digits). So the loss is two means, each weighted a half: over the
masked answer tokens (the answer and its first EOS) and over the masked tail. And most batches
use the shorter canvases, which cost less and hold the same answer.

Time-budgeted and resumable: ``--seconds`` is the total budget; a run that finds
``OUT/train_state.pt`` continues from it until the budget is spent. The checkpoint
(``OUT/``: weights in bf16 safetensors, config, tokenizer, card) is rewritten every
``--save-every`` seconds and at the end. The optimizer state (fp32, three times the weights)
stays on the machine that trains; ``--init`` starts a new run from a checkpoint's weights
alone (a fresh optimizer and warm-up), which is how training continues on another machine:
only the 10 MB of bf16 weights travel.

Batches are made on the CPU by a producer thread, up to two ahead of the step that uses
them; the log gives the share of the time the loop waited for them. (``make_batch`` is
Python-bound and shares the interpreter lock with the loop's kernel launches: whether the
thread pays on the GPU is not measured yet.)
"""

from __future__ import annotations

import json
import math
import queue
import random
import threading
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


# canvases a quarter, half or all of gen_length (the decoder meets them all in the bench), the
# short ones most often: the same answer in a quarter of the tokens
CANVASES = ((4, 0.6), (2, 0.25), (1, 0.15))


def make_batch(config: TrainConfig, tokenizer, rng: random.Random, generator: torch.Generator, device):
    """(input_ids, labels, attention_mask, answer) of one batch; labels are -100 where no loss is
    taken; ``answer`` marks the answer's positions and its first EOS (the rest is tail)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = [(config.gen_length // part, weight) for part, weight in CANVASES if config.gen_length // part > MAX_ANSWER]
    gen = rng.choices([length for length, _ in lengths], weights=[weight for _, weight in lengths])[0]
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
    answer = torch.zeros_like(input_ids, dtype=torch.bool)
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
        answer[row, start:start + response.index(tokenizer.eos_token_id) + 1] = True
    return input_ids.to(device), labels.to(device), attention.to(device), answer.to(device)


def balanced_loss(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Half the mean cross-entropy over masked answer tokens, half over the masked tail (the
    whole weight on whichever part holds masked tokens when the other holds none)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                             reduction="none").view_as(labels)
    scored = labels != -100
    # tensor arithmetic only: asking whether a part holds a token would wait for the GPU every step
    counts = torch.stack([(scored & answer).sum(), (scored & ~answer).sum()])
    sums = torch.stack([(losses * (scored & answer)).sum(), (losses * (scored & ~answer)).sum()])
    present = (counts > 0).float()
    return (sums / counts.clamp_min(1) * present).sum() / present.sum().clamp_min(1)


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


class _Batches:
    """``make_batch`` on a producer thread, ``ahead`` batches in advance, in the order the loop
    would make them itself. An error in ``make_batch`` reaches the loop at its next batch."""

    def __init__(self, config, tokenizer, rng, generator, ahead: int = 2):
        self.queue, self.stop = queue.Queue(maxsize=ahead), threading.Event()
        self.waited = 0.0  # seconds the training loop spent waiting for a batch
        self.thread = threading.Thread(target=self._produce, args=(config, tokenizer, rng, generator), daemon=True)
        self.thread.start()

    def _produce(self, config, tokenizer, rng, generator):
        try:
            while not self.stop.is_set():
                self._put(make_batch(config, tokenizer, rng, generator, "cpu"))
        except Exception as error:  # noqa: BLE001 - handed to the training loop, which raises it
            self._put(error)

    def _put(self, item):
        """Into the queue, unless the loop has stopped taking (close() must not wait on a full queue)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, device: str):
        began = time.perf_counter()
        batch = self.queue.get()
        self.waited += time.perf_counter() - began
        if isinstance(batch, Exception):
            raise batch
        return tuple(tensor.to(device, non_blocking=True) for tensor in batch)

    def close(self):
        self.stop.set()
        self.thread.join()


def _initial_weights(model, init: Path, log) -> int:
    """Load a checkpoint's weights into ``model`` (refusing another architecture); returns the
    steps that checkpoint had been trained for (0 where its train.json is missing)."""
    from cadence.dllm.load import checkpoint_directory, load

    source, _ = load(init)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")
    ours, theirs = ({key: getattr(m.config, key) for key in keys} for m in (model, source))
    if ours != theirs:
        raise ValueError(f"--init {str(init)!r} is another architecture: {theirs}; this size is {ours}")
    model.load_state_dict(source.state_dict())
    record = checkpoint_directory(init) / "train.json"
    trained = json.loads(record.read_text()) if record.is_file() else {}
    steps = trained.get("total_steps", trained.get("steps", 0))
    log(f"starting from the weights of {init} ({steps} steps), with a fresh optimizer")
    return steps


def train(config: TrainConfig, out: Path, device: str = "cpu", save_every: float = 60.0, log=print,
          state: Path | None = None, init: Path | None = None) -> dict:
    """Train (or resume) into ``out``; the optimizer state (three times the weights, in fp32)
    goes to ``state``, by default ``out/train_state.pt``, elsewhere to keep ``out`` small.
    ``init``: a checkpoint directory whose weights a new run starts from (ignored on resume)."""
    from cadence.models.llada import build_llada

    out = Path(out)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    model = build_llada(config.size).to(device)
    if model.config.max_position_embeddings < MAX_PROMPT + 1 + config.gen_length:
        raise ValueError(f"size {config.size!r} has a context of {model.config.max_position_embeddings} tokens; "
                         f"gen_length={config.gen_length} with the longest prompt ({MAX_PROMPT + 1}) does not fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, elapsed, losses, earlier, started_from = 0, 0.0, [], 0, None
    state_path = Path(state) if state is not None else out / STATE
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != asdict(config) | {"seconds": state["config"]["seconds"]}:
            raise ValueError(f"{state_path} was written by another configuration: {state['config']}; "
                             "use another --out or the same options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        earlier, started_from = state.get("earlier", 0), state.get("init")
        log(f"resuming at step {step}, {elapsed:.0f} s of {config.seconds:.0f} s spent")
    elif init is not None:
        earlier, started_from = _initial_weights(model, init, log), str(init)
    rng = random.Random(1000 + config.seed + step)  # never seed 0, the evaluation draws
    generator = torch.Generator().manual_seed(1000 + config.seed + step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    model.train()
    batches = _Batches(config, tokenizer, rng, generator)
    started, last_save = time.perf_counter() - elapsed, time.perf_counter()
    last_log = (time.perf_counter(), 0.0, step)  # (clock, seconds waited for batches, step) at the last log line
    saved_at, pending = None, []
    try:
        while elapsed < config.seconds:
            input_ids, labels, attention, answer = batches.next(device)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step, elapsed)
            with autocast:
                logits = model(input_ids=input_ids, attention_mask=attention).logits
            loss = balanced_loss(logits, labels, answer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            pending.append(loss.detach())  # read back every 100 steps: .item() would wait for the GPU each step
            step += 1
            elapsed = time.perf_counter() - started
            save = time.perf_counter() - last_save > save_every or elapsed >= config.seconds
            if step % 100 == 0 or save:
                losses.extend(torch.stack(pending).tolist())
                pending.clear()
            if step % 100 == 0:
                now = time.perf_counter()
                waiting = (batches.waited - last_log[1]) / (now - last_log[0])
                log(f"step {step}  loss {sum(losses[-100:]) / 100:.4f}  {elapsed:.0f}/{config.seconds:.0f} s  "
                    f"{(step - last_log[2]) / (now - last_log[0]):.1f} steps/s, {waiting:.0%} of it waiting for "
                    "batches")
                last_log = (now, batches.waited, step)
            if save:
                save_checkpoint(model, tokenizer, out)
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "elapsed": elapsed, "losses": losses, "config": asdict(config), "earlier": earlier,
                            "init": started_from},
                           state_path)
                last_save, saved_at = time.perf_counter(), step
    finally:
        batches.close()
    if saved_at != step:  # a budget already spent: the checkpoint still holds the weights trained so far
        save_checkpoint(model, tokenizer, out)
    summary = {"config": asdict(config), "steps": step, "total_steps": earlier + step, "seconds": round(elapsed, 1),
               "init": started_from, "device": _device_name(device),
               "torch": torch.__version__, "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4)}
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"
