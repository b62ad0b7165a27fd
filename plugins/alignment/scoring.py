"""Scoring conversations with a reward model directory, tokenized exactly as training tokenizes them.

A reward model directory holds a transformers ``*ForSequenceClassification`` model with one label
(``num_labels=1``), its tokenizer, and usually the run record (``lmflow_run.json``) of the run that trained it,
which names the conversation template it was trained with (the ``reward_model`` plugin writes such
directories). A conversation (a user prompt and the assistant's answer, or any whole conversation) is rendered
with that template without a generation prompt and encoded with :func:`lmflow_core.encode_segments`; its score
is the model's single logit at the last token (the model's own pooling, which finds the last token that is not
``config.pad_token_id``). Batches are right-padded with that id and carry an attention mask, so a batch scores
each conversation as it scores alone.

    from lmflow_plugins.alignment.scoring import RewardModel

    scorer = RewardModel.load("reward-out")                    # template: the one stored with the model
    scorer.score([[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmflow_core import (
    RUN_RECORD,
    Conversation,
    LmflowError,
    Template,
    TemplateError,
    encode_segments,
    get_template,
    quiet_libraries,
    read_json,
    stored_run,
)

__all__ = ["RewardModel", "check_reward_model_dir", "render_conversation"]

CONFIG = "config.json"


def check_reward_model_dir(path: str | os.PathLike, option: str = "--reward") -> None:
    """Refuse, without loading weights, a directory that is not a one-label sequence-classification model.

    Reads only ``config.json``: the architecture must be a ``*ForSequenceClassification`` (when the config names
    one) and the number of labels 1.
    """
    directory = Path(path)
    hint = (
        "pass a reward model directory (a *ForSequenceClassification model with num_labels=1, e.g. the output "
        "of lmflow run --plugins reward_model)"
    )
    if not directory.is_dir():
        raise LmflowError(f"{option} {directory} is not a directory", hint)
    config = read_json(directory / CONFIG)
    if not config:
        raise LmflowError(f"{option} {directory} holds no model ({CONFIG} is missing or unreadable)", hint)
    architectures = config.get("architectures") or []
    if architectures and not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise LmflowError(
            f"{option} {directory} holds a {', '.join(architectures)}, not a sequence-classification model",
            hint,
        )
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if labels != 1:
        raise LmflowError(
            f"{option} {directory} is a classifier with {labels} labels; a reward model has one score "
            "(num_labels=1)",
            hint,
        )


def render_conversation(template: Template, conversation: Conversation, tokenizer: Any) -> list[Any]:
    """The segments of a whole conversation as training renders it (no generation prompt)."""
    template.check(conversation)
    return template.render(conversation, False, tokenizer)


@dataclass
class RewardModel:
    """A loaded reward model: ``score(conversations)`` gives one float per conversation.

    Create it with :meth:`load`. Attributes: ``model`` (the ``*ForSequenceClassification``, in eval mode),
    ``tokenizer``, ``template`` and ``template_name`` (how conversations are rendered), ``path``.
    """

    model: Any
    tokenizer: Any
    template: Template
    template_name: str
    path: Path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        template: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """Load the reward model in ``path`` with its tokenizer.

        Args:
            template: the template to use when none is stored with the reward model (in its
                ``lmflow_run.json``), e.g. the policy's; the stored one always wins. Without either, the
                tokenizer's own chat template is used if it has one.
            device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``...
            dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (as stored).

        Raises:
            LmflowError: not a one-label sequence-classification model, no template to render with.
        """
        check_reward_model_dir(path)
        directory = Path(path)
        template_name = stored_run(str(directory)).get("template") or template
        quiet_libraries()
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        if template_name is None and getattr(tokenizer, "chat_template", None):
            template_name = "tokenizer"
        if template_name is None:
            raise LmflowError(
                f"reward model {directory} has no conversation template (none in its {RUN_RECORD}, none "
                "given, and its tokenizer has no chat template)",
                "pass the template it was trained with (--template NAME)",
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForSequenceClassification.from_pretrained(
            directory,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
        )
        model.to(device).eval()
        return cls(model, tokenizer, get_template(template_name), template_name, directory)

    def encode(self, conversations: Sequence[Sequence[dict[str, Any]] | Conversation]) -> list[list[int]]:
        """The token ids of each conversation, exactly as training encodes it."""
        segments = []
        for index, item in enumerate(conversations):
            conversation = item if isinstance(item, Conversation) else Conversation.from_messages(list(item))
            try:
                segments.append(render_conversation(self.template, conversation, self.tokenizer))
            except TemplateError as exc:
                raise TemplateError(
                    f"conversation {index} cannot be scored with the template '{self.template_name}' of reward "
                    f"model {self.path}: {exc.message}",
                    exc.hint or "fix the conversation",
                ) from None
        ids, _labels = encode_segments(self.tokenizer, segments, self.template)
        return ids

    def score(
        self, conversations: Sequence[Sequence[dict[str, Any]] | Conversation], batch_size: int = 8
    ) -> list[float]:
        """One reward per conversation: the model's logit at the conversation's last token.

        ``conversations`` are lists of OpenAI-style messages (``{"role", "content"}``, a leading ``system``
        message taken as the system prompt) or :class:`lmflow_core.Conversation` objects, each ending with the
        answer to score.
        """
        import torch

        all_ids = self.encode(conversations)
        context = getattr(self.model.config, "max_position_embeddings", None)
        for index, ids in enumerate(all_ids):
            if not ids:
                raise LmflowError(f"conversation {index} renders to no tokens", "give it a message")
            if context and len(ids) > context:
                raise LmflowError(
                    f"conversation {index} is {len(ids)} tokens long, more than the {context} that reward model "
                    f"{self.path} reads",
                    "shorten the prompt or the answers (--max-new-tokens)",
                )
        pad_id = self.model.config.pad_token_id
        # Without a padding id the model pools at the last position, which is right only for unpadded rows.
        size = batch_size if pad_id is not None else 1
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(all_ids), size):
                batch = all_ids[start : start + size]
                longest = max(len(ids) for ids in batch)
                input_ids = torch.tensor(
                    [ids + [pad_id or 0] * (longest - len(ids)) for ids in batch], device=device
                )
                mask = torch.tensor(
                    [[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=device
                )
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                scores.extend(float(value) for value in logits[:, 0].float().cpu())
        return scores
