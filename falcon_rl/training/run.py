"""A live VLP training run that a negative-mining scheduler steps through.

``TrainingRun`` owns the model, optimizer, embedding bank and batch builder.
Each ``step(hardness)`` builds one mined batch from the current anchors and
the chosen hardness, takes one optimizer step, measures the reward proxy,
refreshes the bank from the step's own ITC features and proposes the next
anchors. The trainer in ``experiments`` and the Gymnasium environments in
``envs`` both drive a run through this class.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from falcon_rl.config import ConfigError, TrainConfig
from falcon_rl.data import ImageTextPairs, load_splits, load_tokenizer, tokenize
from falcon_rl.evaluation import evaluate_retrieval
from falcon_rl.mining import (
    BackgroundSearch,
    OBS_HIGH,
    OBS_LOW,
    SIMILARITY_FEATURE_NAMES,
    BatchBuilder,
    EmbeddingBank,
    FalseNegativeOracle,
    MinedBatch,
    Proposal,
    make_observation,
)
from falcon_rl.models import TextBatch, VLPFramework, build_framework
from falcon_rl.training.augment import flip_shift
from falcon_rl.training.hardware import autocast, evaluation_mode, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

REWARD_PROXIES = {"mlm_gain": "mlm", "itc_gain": "itc", "itm_gain": "itm", "itg_gain": "itg"}
ITM_FILTER_BATCH = 256
LOSS_EMA_DECAY = 0.9
AUGMENT_STREAM = 17  # separates the augmentation's random stream from the MLM mask's


@dataclass
class StepResult:
    """Result of one training step, handed to the scheduler's loop."""

    reward: float
    anchor_rewards: np.ndarray
    observation: np.ndarray
    terminated: bool
    info: dict[str, Any] = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had non-finite loss or gradients.

    :param message: what went non-finite, for the user.
    :param result: the step that reached the limit; the run's state already includes it.
    """

    def __init__(self, message: str, result: StepResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class TrainingRun:
    """One VLP pretraining run whose batch composition a scheduler controls.

    :param config: the run's configuration.
    :param splits: preloaded ``train``/``val``/``test`` pairs; loaded from
        ``config.data`` when omitted.
    :param total_steps: the optimizer-step budget; ``config.steps`` or
        ``config.epochs`` decide it when omitted.
    """

    def __init__(self, config: TrainConfig, splits: dict[str, ImageTextPairs] | None = None,
                 total_steps: int | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            logger.warning("fp16 on CPU is slow and poorly supported; bf16 is the usual choice there")

        # Building the framework once reveals its image size, tokenizer and embedding size.
        self.framework = self._build_framework(config.seed)
        self.tokenizer = load_tokenizer(self.framework.tokenizer_path)
        if splits is None:
            splits = load_splits(config.data, config.image_root, self.framework.image_size,
                                 progress=config.progress)
        self.splits = splits
        self.train_pairs = splits["train"]
        n_pairs = len(self.train_pairs)
        if n_pairs < config.batch_size:
            raise ConfigError(f"the training split has {n_pairs} pairs, fewer than one batch of "
                              f"{config.batch_size}; lower --batch-size or use more data")
        self.input_ids, self.attention_mask = tokenize(self.tokenizer, self.train_pairs.captions,
                                                       self.framework.max_text_length)

        self.n_anchors = math.ceil(config.batch_size / 2)
        self.search_space = min(config.search_space, n_pairs)
        if self.search_space < config.search_space:
            logger.info("search space %d is larger than the %d training pairs; clipped to %d",
                        config.search_space, n_pairs, self.search_space)
        self.steps_per_epoch = math.ceil(n_pairs / config.batch_size)
        self.total_steps = total_steps or config.total_steps(self.steps_per_epoch)
        self.proxy = REWARD_PROXIES[config.reward]
        available = getattr(self.framework, "proxy_losses", ("mlm", "itc", "itm"))
        if self.proxy not in available:
            allowed = ", ".join(f"{name}_gain" for name in available)
            raise ConfigError(f"invalid value for reward: {config.reward!r} (framework {config.framework!r} "
                              f"offers {allowed})")

        if config.itm_rerank and not self.framework.has_itm:
            raise ConfigError(f"invalid value for itm_rerank: {config.itm_rerank!r} (framework "
                              f"{config.framework!r} has no ITM head; use 0)")
        self.fn_filter_threshold = config.fn_filter_threshold()
        if self.fn_filter_threshold is not None and not self.framework.has_itm:
            raise ConfigError(f"invalid value for fn_filter: {config.fn_filter!r} "
                              f"(framework {config.framework!r} has no ITM head)")
        self.observation_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self.oracle = FalseNegativeOracle(self.train_pairs, sentence_threshold=config.fn_sentence_threshold)
        self.uses_mining = True
        self._filtered_count = 0
        self._new_embeddings: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None
        self.search: BackgroundSearch | None = None
        self._initialised = False

    # -- construction -------------------------------------------------------

    def _build_framework(self, seed: int) -> VLPFramework:
        torch.manual_seed(seed)
        framework = build_framework(self.config.framework, self.config.preset, **self.config.model_options)
        return framework.to(self.device)

    def _build_optimizer(self) -> None:
        decay, no_decay = [], []
        for name, parameter in self.framework.named_parameters():
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim < 2 or "temp" in name else decay).append(parameter)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr)
        warmup, total = self.config.warmup_steps, max(self.total_steps, 1)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def reset(self, seed: int | None = None, uses_mining: bool = True) -> np.ndarray:
        """Start the run afresh: a new model, optimizer, bank and data order from ``seed``.

        Returns the first step's anchor observations ``[A, F]``.
        """
        seed = self.config.seed if seed is None else seed
        self.seed = seed
        self.uses_mining = uses_mining
        self.framework = self._build_framework(seed)
        self.framework.train()
        self._build_optimizer()

        self._cache_training_texts()
        self.bank = EmbeddingBank(len(self.train_pairs), self.framework.embed_dim, device=self.device)
        if self.config.bank_init == "encode" and uses_mining:
            self._fill_bank()
        else:
            self._fill_bank_random(seed)
        self.builder = BatchBuilder(self.train_pairs.image_ids, self.config.batch_size, self.search_space,
                                    self.config.top_k, seed, backend=self.config.search_backend)
        self._start_search_thread()

        self.step_count = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.loss_ema = float("nan")
        self.loss_change = 0.0
        self.proposal: Proposal | None = self.builder.propose(self.bank) if uses_mining else None
        self._initialised = True
        return self.observation()

    @torch.no_grad()
    def _cache_training_texts(self) -> None:
        """Let the framework precompute what it reuses for the training captions."""
        with autocast(self.device, self.precision):
            self.framework.cache_texts(TextBatch(self.input_ids, self.attention_mask))

    @torch.no_grad()
    def _fill_bank(self) -> None:
        """Encode every training pair once, so the first batches are already mined."""
        batch = 256
        pairs = self.train_pairs
        with evaluation_mode(self.framework), autocast(self.device, self.precision):
            image_embeds = []
            for start in range(0, pairs.n_images, batch):
                images = self.framework.preprocess_images(pairs.images[start:start + batch].to(self.device))
                image_embeds.append(self.framework.embed_images(images).float())
            image_embed = torch.cat(image_embeds)[torch.as_tensor(pairs.image_ids)]
            # Captions go in order of length, so each chunk pads to a similar length and the
            # encoder skips most padding; the rows are put back in pair order afterwards.
            order = torch.argsort(self.attention_mask.sum(dim=1), stable=True)
            text_embeds = []
            for start in range(0, len(pairs), batch):
                chunk = order[start:start + batch]
                text = TextBatch(self.input_ids[chunk].to(self.device), self.attention_mask[chunk].to(self.device))
                text_embeds.append(self.framework.embed_texts(text).float())
        text_embed = torch.empty_like(torch.cat(text_embeds))
        text_embed[order.to(text_embed.device)] = torch.cat(text_embeds)
        indices = np.arange(len(pairs))
        self.bank.update(indices, image_embed, text_embed)

    def _fill_bank_random(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (len(self.train_pairs), self.framework.embed_dim)
        image = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=-1)
        self.bank.fill(image.to(self.device), text.to(self.device))

    def _start_search_thread(self) -> None:
        if self.search is not None:
            self.search.close()
        self.search = BackgroundSearch(self.builder) if self.config.background_search else None

    def close(self) -> None:
        """Stop the background search thread, if any."""
        if self.search is not None:
            self.search.close()
            self.search = None

    # -- observation --------------------------------------------------------

    def observation(self) -> np.ndarray:
        """Anchor observations ``[A, F]`` for the next step, padded to ``A`` rows by repetition."""
        progress = self.step_count / max(self.total_steps, 1)
        loss_features = np.array([0.0 if math.isnan(self.loss_ema) else self.loss_ema, self.loss_change],
                                 dtype=np.float32)
        if self.proposal is None:
            features = np.zeros((self.n_anchors, OBS_LOW.shape[0]), dtype=np.float32)
            features[:] = make_observation(np.zeros((1, len(SIMILARITY_FEATURE_NAMES)), np.float32),
                                           progress, loss_features)
            return features
        observation = make_observation(self.proposal.features, progress, loss_features)
        if len(observation) < self.n_anchors:
            repeat = np.resize(np.arange(len(observation)), self.n_anchors)
            observation = observation[repeat]
        return observation

    # -- one step -----------------------------------------------------------

    def step(self, hardness: np.ndarray | None) -> StepResult:
        """Build a batch with per-anchor ``hardness`` in [0, 1], train on it and observe the reward.

        ``hardness`` is ignored (and may be None) when mining is off.
        """
        if not self._initialised:
            raise RuntimeError("call reset() before step()")
        batch = self._next_batch(hardness)
        next_proposal = self._start_next_proposal()
        try:
            losses, reward, updated = self._train_on(batch)
        finally:
            if self.search is not None and self.search.pending:
                next_proposal = self.search.result()
        if self._new_embeddings is not None:
            # The bank changes only after the next proposal is in, so background and inline
            # search read the same bank: the one from before this step.
            self.bank.update(*self._new_embeddings)
            self._new_embeddings = None

        fn_labels = self._label_false_negatives(batch)
        self.step_count += 1
        terminated = self.step_count >= self.total_steps
        if self.builder.epoch_finished:
            self.builder.start_next_epoch()
        if next_proposal is not None:
            self.proposal = next_proposal

        info = self._step_info(batch, losses, reward, updated, fn_labels)
        anchor_rewards = np.full(self.n_anchors, reward, dtype=np.float32)
        result = StepResult(reward, anchor_rewards, self.observation(), terminated, info)
        # Raised only after the step's bookkeeping, so the run's state (and a checkpoint of it)
        # includes the skipped step and the next proposal.
        if not updated and self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
            raise NonFiniteError(self._nonfinite_message(losses), result)
        return result

    def _start_next_proposal(self) -> Proposal | None:
        """Search the next step's candidates, in the background when enabled (then it returns None)."""
        if not self.uses_mining or self.step_count + 1 >= self.total_steps:
            return None
        if self.search is not None:
            self.search.submit(self.bank)
            return None
        return self.builder.propose(self.bank)

    def _next_batch(self, hardness: np.ndarray | None) -> MinedBatch:
        if not self.uses_mining:
            return self.builder.random_batch()
        n_anchors = len(self.proposal.anchors)
        if hardness is None:
            raise ValueError("hardness is required while mining is on")
        hardness = np.asarray(hardness, dtype=np.float32).reshape(-1)
        if hardness.size == 1:
            hardness = np.full(n_anchors, hardness.item(), dtype=np.float32)
        hardness = np.clip(np.nan_to_num(hardness[:n_anchors], nan=1.0), 0.0, 1.0)
        excluded = self._itm_filter(self.proposal) if self.fn_filter_threshold is not None else None
        return self.builder.select(self.proposal, hardness, excluded)

    @torch.no_grad()
    def _itm_filter(self, proposal: Proposal) -> np.ndarray:
        """Mark candidates that the current ITM head takes for matches of their anchor (MAFA-style).

        A candidate is excluded when either cross pairing, anchor image with
        candidate caption or candidate image with anchor caption, has an ITM
        match probability above the threshold.
        """
        valid = proposal.candidates >= 0
        anchors = np.repeat(proposal.anchors[:, None], proposal.candidates.shape[1], axis=1)[valid]
        candidates = proposal.candidates[valid]
        probabilities = np.zeros(len(candidates), dtype=np.float32)
        for start in range(0, len(candidates), ITM_FILTER_BATCH):
            chunk = slice(start, start + ITM_FILTER_BATCH)
            with autocast(self.device, self.precision):
                first = self._match_prob(anchors[chunk], candidates[chunk])
                second = self._match_prob(candidates[chunk], anchors[chunk])
            probabilities[chunk] = np.maximum(first, second)
        excluded = np.zeros(proposal.candidates.shape, dtype=bool)
        excluded[valid] = probabilities > self.fn_filter_threshold
        self._filtered_count = int(excluded.sum())
        return excluded

    def _match_prob(self, image_pairs: np.ndarray, text_pairs: np.ndarray) -> np.ndarray:
        image_index = torch.as_tensor(self.train_pairs.image_ids[image_pairs], dtype=torch.long)
        images = self.framework.preprocess_images(self.train_pairs.images[image_index].to(self.device))
        text_index = torch.as_tensor(text_pairs, dtype=torch.long)
        text = TextBatch(self.input_ids[text_index].to(self.device), self.attention_mask[text_index].to(self.device))
        return self.framework.itm_match_prob(images, text).float().cpu().numpy()

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the configured augmentation to this step's training images."""
        if self.config.augment == "none":
            return images
        # Seeded by the run's seed and step, so a resumed run draws the same flips and shifts.
        entropy = np.random.SeedSequence([self.seed, self.step_count, AUGMENT_STREAM])
        return flip_shift(images, torch.Generator().manual_seed(int(entropy.generate_state(1)[0])))

    def _train_on(self, batch: MinedBatch) -> tuple[dict[str, float], float, bool]:
        """Take one optimizer step on ``batch``; return its losses, the reward and whether it updated."""
        pairs = torch.as_tensor(batch.pair_indices, dtype=torch.long)
        image_index = torch.as_tensor(self.train_pairs.image_ids[batch.pair_indices], dtype=torch.long)
        images = self._augment(self.framework.preprocess_images(self.train_pairs.images[image_index].to(self.device)))
        text = TextBatch(self.input_ids[pairs].to(self.device), self.attention_mask[pairs].to(self.device))
        image_ids = image_index.to(self.device)
        mask_seed = self.seed * 1_000_003 + self.step_count

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            output = self.framework.training_step(images, text, image_ids, mask_seed)
        losses = {name: float(value) for name, value in output.losses.items()}
        losses["total"] = float(output.loss.detach())

        updated = math.isfinite(losses["total"])
        if updated:
            self.scaler.scale(output.loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = self._clip_gradients()
            updated = math.isfinite(grad_norm)
            losses["grad_norm"] = grad_norm
        if updated:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_schedule.step()
            self.consecutive_nonfinite = 0
            # Only finite embeddings refresh the bank, so one bad step cannot poison mining.
            self._new_embeddings = (batch.pair_indices, output.image_embed.float(), output.text_embed.float())
        else:
            self._record_nonfinite(losses)
            return losses, 0.0, False

        before = losses.get(self.proxy, float("nan"))
        with torch.no_grad(), autocast(self.device, self.precision):
            after = float(self.framework.proxy_loss(self.proxy, images, text, image_ids, mask_seed))
        reward = before - after
        if not math.isfinite(reward):
            reward = 0.0
        losses[f"{self.proxy}_after"] = after
        self._update_loss_features(losses["total"])
        return losses, reward, True

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.framework.parameters() if p.grad is not None]
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        return float(norm)

    def _record_nonfinite(self, losses: dict[str, float]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            # Lowering the loss scale after inf gradients is the fp16 scaler's normal recovery path.
            self.scaler.update()
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        source = "loss" if not math.isfinite(losses["total"]) else "gradients"
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        logger.warning("step %d skipped: non-finite %s (%s)", self.step_count + 1, source, ", ".join(bad) or source)

    def _nonfinite_message(self, losses: dict[str, float]) -> str:
        source = "loss" if not math.isfinite(losses["total"]) else "gradients"
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        return (f"{self.consecutive_nonfinite} consecutive steps had non-finite {source} ({', '.join(bad) or source}); "
                f"the learning rate ({self.config.lr}) may be too high")

    def _update_loss_features(self, loss: float) -> None:
        if math.isnan(self.loss_ema):
            self.loss_ema = loss
            return
        previous = self.loss_ema
        self.loss_ema = LOSS_EMA_DECAY * self.loss_ema + (1 - LOSS_EMA_DECAY) * loss
        self.loss_change = self.loss_ema - previous

    def _label_false_negatives(self, batch: MinedBatch) -> np.ndarray:
        """Oracle labels per anchor (see ``FalseNegativeOracle``), -1 where the anchor has no negative."""
        labels = np.full(len(batch.anchors), -1, dtype=np.int8)
        valid = batch.negatives >= 0
        if valid.any():
            labels[valid] = self.oracle.label(batch.anchors[valid], batch.negatives[valid])
        return labels

    def _step_info(self, batch: MinedBatch, losses: dict[str, float], reward: float, updated: bool,
                   fn_labels: np.ndarray) -> dict[str, Any]:
        mined = self.uses_mining and batch.hardness is not None
        labelled = fn_labels[fn_labels >= 0]
        return {
            "step": self.step_count,
            "total_steps": self.total_steps,
            "epoch": self.builder.epoch,
            "epoch_end": bool(batch.epoch_end),
            "losses": losses,
            "reward": reward,
            "updated": updated,
            "skipped_steps": self.skipped_steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "batch_size": len(batch.pair_indices),
            "hardness": batch.hardness if mined else None,
            "mean_hardness": float(np.mean(batch.hardness)) if mined and len(batch.hardness) else None,
            "mined_fn_rate": float(np.mean(labelled > 0)) if mined and len(labelled) else None,
            "fn_labels": fn_labels,
            "fallbacks": dict(batch.fallbacks),
            "fn_filtered": self._filtered_count if self.fn_filter_threshold is not None else None,
        }

    # -- evaluation ---------------------------------------------------------

    def evaluate(self, split: str, progress: bool = False) -> dict[str, Any]:
        """Image-text retrieval metrics of the current model on ``split``."""
        return evaluate_retrieval(self.framework, self.splits[split], self.tokenizer, self.device,
                                  itm_rerank_k=self.config.itm_rerank, precision=self.precision,
                                  progress=progress)

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the run's future depends on, except the scheduler and global random generators."""
        return {
            "framework": self.framework.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "bank": self.bank.state_dict(),
            "builder": self.builder.state_dict(),
            "proposal": dataclasses.asdict(self.proposal) if self.proposal is not None else None,
            "counters": {
                "seed": self.seed,
                "step": self.step_count,
                "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "loss_ema": self.loss_ema,
                "loss_change": self.loss_change,
                "uses_mining": self.uses_mining,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counters = state["counters"]
        if not self._initialised or self.seed != counters["seed"]:
            self._prepare_empty(counters["seed"], counters["uses_mining"])
        self.framework.load_state_dict(state["framework"])
        self._cache_training_texts()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.bank.load_state_dict(state["bank"])
        self.builder.load_state_dict(state["builder"])
        self.proposal = Proposal(**state["proposal"]) if state["proposal"] is not None else None
        # The last step of a budget proposes nothing, so a run extended past it needs a fresh proposal.
        stale = self.proposal is None or (self.proposal.epoch, self.proposal.batch_index) != \
            (self.builder.epoch, self.builder.batch_index)
        if self.uses_mining and stale:
            self.proposal = self.builder.propose(self.bank)
        self.step_count = counters["step"]
        self.skipped_steps = counters["skipped_steps"]
        self.consecutive_nonfinite = counters["consecutive_nonfinite"]
        self.loss_ema = counters["loss_ema"]
        self.loss_change = counters["loss_change"]

    def _prepare_empty(self, seed: int, uses_mining: bool) -> None:
        """Build the run's objects without the initial bank pass, for loading a checkpoint into."""
        self.seed = seed
        self.uses_mining = uses_mining
        self.framework = self._build_framework(seed)
        self.framework.train()
        self._build_optimizer()
        self.bank = EmbeddingBank(len(self.train_pairs), self.framework.embed_dim, device=self.device)
        self.builder = BatchBuilder(self.train_pairs.image_ids, self.config.batch_size, self.search_space,
                                    self.config.top_k, seed, backend=self.config.search_backend)
        self._start_search_thread()
        self._initialised = True
