"""LLM question generators: any OpenAI-compatible chat endpoint, or a local transformers chat model.

Both build the same chat (FingER Sec. 3.2.2: task, dimension definitions with key points,
in-context examples, then the user's prompt), parse replies with `parse.py`, retry prompts whose
reply could not be used, and then either fall back to another generator (the template one) or
report each failed prompt in a `GenerationError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from finger_reward.chat_http import RetryPolicy, auth_headers, post_json, resolve_endpoint
from finger_reward.questions.config import QuestionConfig, load_question_config
from finger_reward.questions.generate import GenerationError, QuestionGenerator, tidy
from finger_reward.questions.parse import parse_questions
from finger_reward.questions.record import Question

logger = logging.getLogger(__name__)


def build_messages(prompt: str, config: QuestionConfig) -> list[dict]:
    """System turn with the task and dimensions, one user/assistant pair per example, then the prompt."""
    dims = "\n".join(
        f"- {dim_id} ({spec.name}): {spec.definition} Key points: {'; '.join(spec.key_points)}."
        for dim_id, spec in config.dimensions.items()
    )
    system = f"{config.task}\n\n{config.entity_instructions}\n\nThe five dimensions:\n{dims}\n\n{config.output_format}"
    messages = [{"role": "system", "content": system}]
    for example in config.examples:
        answer = {"entities": example.get("entities", []), "questions": example["questions"]}
        messages += [{"role": "user", "content": f"Prompt: {example['prompt']}"},
                     {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}]
    messages.append({"role": "user", "content": f"Prompt: {prompt}"})
    return messages


def generate_with_retries(
    prompts: Sequence[str],
    complete: Callable[[list[list[dict]], int], list[str | Exception]],
    *,
    config: QuestionConfig,
    max_per_dimension: int,
    max_retries: int,
    fallback: QuestionGenerator | None,
) -> dict[str, list[Question]]:
    """Ask `complete` for every prompt; re-ask the prompts whose reply was unusable, up to `max_retries` times.

    A failed request is not asked again here: `complete` has retried it already (a dead server would
    otherwise be asked (max_retries + 1)^2 times per prompt)."""
    results: dict[str, list[Question]] = {}
    failures: dict[str, str] = {}
    pending = list(dict.fromkeys(prompts))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        replies = complete([build_messages(p, config) for p in pending], attempt)
        retry = []
        for prompt, reply in zip(pending, replies):
            questions, why = _use_reply(prompt, reply, max_per_dimension)
            if questions:
                results[prompt] = questions
                failures.pop(prompt, None)
            elif isinstance(reply, Exception):  # the request already used its own retries and says so
                failures[prompt] = why
            else:
                failures[prompt] = f"{why} (after {attempt + 1} attempt(s))"
                retry.append(prompt)
        pending = retry
    if failures and fallback is not None:
        logger.warning("question generation failed for %d prompt(s); using %s for them: %s",
                       len(failures), type(fallback).__name__, failures)
        results.update(fallback.generate_questions(list(failures)))
        failures = {}
    if failures:
        raise GenerationError(failures, results)
    return results


def _use_reply(prompt: str, reply: str | Exception, cap: int) -> tuple[list[Question], str]:
    if isinstance(reply, Exception):
        return [], f"request failed: {reply}"
    questions, problems = parse_questions(reply, prompt)
    if problems:
        logger.info("repaired or dropped parts of the reply for %r: %s", prompt, problems)
    questions = tidy(questions, cap)
    return questions, ("unusable reply: " + "; ".join(problems[:3])) if not questions else ""


class OpenAIGenerator:
    """Questions from an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, ...).

    `base_url` and `api_key` default to $OPENAI_BASE_URL (else https://api.openai.com/v1) and
    $OPENAI_API_KEY. Up to `concurrency` requests run at once; timeouts, 429 and 5xx answers are
    retried with exponential back-off (honouring Retry-After), and so are unusable replies.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        config: QuestionConfig | None = None,
        max_per_dimension: int | None = None,
        concurrency: int = 8,
        max_retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int = 2048,
        fallback: QuestionGenerator | None = None,
    ):
        self.model = model
        self.base_url, self.api_key = resolve_endpoint(base_url, api_key)
        self.config = config or load_question_config()
        self.max_per_dimension = max_per_dimension or self.config.max_per_dimension
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.backoff, self.temperature, self.max_tokens = backoff, temperature, max_tokens
        self.fallback = fallback

    def generate_questions(self, prompts: Sequence[str]) -> dict[str, list[Question]]:
        import httpx
        from concurrent.futures import ThreadPoolExecutor

        limits = httpx.Limits(max_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout, limits=limits) as client, ThreadPoolExecutor(self.concurrency) as pool:
            def complete(batch: list[list[dict]], attempt: int) -> list[str | Exception]:
                return list(pool.map(lambda messages: self._request(client, messages, attempt), batch))

            return generate_with_retries(prompts, complete, config=self.config, max_per_dimension=self.max_per_dimension,
                                         max_retries=self.max_retries, fallback=self.fallback)

    def _request(self, client, messages: list[dict], attempt: int) -> str | Exception:
        # A retry after an unusable reply samples, so it does not get the same reply again.
        temperature = self.temperature if attempt == 0 else max(self.temperature, 0.7)
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": self.max_tokens}
        policy = RetryPolicy(max_retries=self.max_retries, backoff=self.backoff)
        try:
            reply = post_json(client, f"{self.base_url}/chat/completions", body,
                              headers=auth_headers(self.api_key), policy=policy)
        except Exception as err:  # HTTP errors after retries; reported per prompt
            return err
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ValueError(f"malformed chat-completions response: {str(reply)[:200]!r}")


class TransformersGenerator:
    """Questions from a local chat LLM loaded with transformers (e.g. Qwen2.5-7B-Instruct), batched.

    The first attempt decodes greedily; retries sample (temperature 0.7) to get a different reply.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        config: QuestionConfig | None = None,
        max_per_dimension: int | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 1024,
        max_retries: int = 1,
        device=None,
        dtype=None,
        fallback: QuestionGenerator | None = None,
    ):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from finger_reward.engine import default_device_dtype

            device, dtype = default_device_dtype(device, dtype)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with an already-loaded model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or load_question_config()
        self.max_per_dimension = max_per_dimension or self.config.max_per_dimension
        self.batch_size, self.max_new_tokens, self.max_retries = batch_size, max_new_tokens, max_retries
        self.fallback = fallback

    def generate_questions(self, prompts: Sequence[str]) -> dict[str, list[Question]]:
        return generate_with_retries(prompts, self._complete, config=self.config, max_per_dimension=self.max_per_dimension,
                                     max_retries=self.max_retries, fallback=self.fallback)

    def _complete(self, batch: list[list[dict]], attempt: int) -> list[str | Exception]:
        import torch

        replies: list[str | Exception] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(batch), self.batch_size):
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in batch[start : start + self.batch_size]]
            self.tokenizer.padding_side = "left"  # generation continues from the right edge
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.model.device)
            sampling = {"do_sample": True, "temperature": 0.7} if attempt else {"do_sample": False}
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=pad, **sampling)
            new = out[:, inputs["input_ids"].shape[1] :]
            replies += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return replies
