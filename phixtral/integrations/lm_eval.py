"""lm-evaluation-harness model `phixtral`: loglikelihood, loglikelihood_rolling and generate_until, batched.

From Python, importing this module registers the name:

    import lm_eval, phixtral.integrations.lm_eval
    lm_eval.simple_evaluate(model="phixtral", model_args="pretrained=DIR,dtype=float32", tasks=[...])
    lm_eval.simple_evaluate(model=PhixtralLM(model=my_loaded_model), tasks=[...])   # a model already in memory

From the command line, `python -m phixtral.integrations.lm_eval ARGS` is lm_eval's own command line with `phixtral`
registered (lm_eval 0.4 finds models only in its own table: it reads no entry points of installed packages):

    python -m phixtral.integrations.lm_eval --model phixtral --model_args pretrained=DIR,dtype=float32 --tasks ...

Scoring runs the model's plain forward (no KV cache) on right-padded batches sorted by length, so padding never
touches a scored position; generate_until runs `model.generate` on left-padded token ids, greedy unless the task sets
do_sample, and stops at the task's `until` strings and at eos.
"""

import difflib
import inspect
import json
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from ..model import Phixtral
from ..text import decode_text, left_pad, row_text
from ..weights import default_model_path, from_pretrained

log = logging.getLogger(__name__)

# generate_until's gen_kwargs this model reads; others are warned about once and ignored.
_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}
# What building the model from model_args may raise (a misspelled name, a pretrained= that is no checkpoint, ...):
# main() prints these in one line, as `phixtral`'s own commands do, instead of lm_eval's traceback.
_MODEL_ARGS_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


class PhixtralLM(TemplateLM):
    """lm_eval's LM over a Phixtral.

    pretrained: checkpoint folder or hub id (default: the bundled tiny phixtral); or model=: a Phixtral already loaded.
    dtype, device, backend, num_experts_per_tok: as `phixtral.from_pretrained` (a CUDA device without CUDA, such as
    lm_eval's default cuda:0 on a CPU machine, falls back to the CPU with a warning).
    batch_size: sequences per forward ("auto" takes max_batch_size, else 16); max_length: context tokens (default:
    n_positions); max_gen_toks: generate_until's default budget; add_bos_token: prepend the tokenizer's special tokens.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        *,
        model: Optional[Phixtral] = None,
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        backend: str = "auto",
        num_experts_per_tok: Optional[int] = None,
        batch_size=8,
        max_batch_size: Optional[int] = None,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
    ):
        super().__init__()
        if model is None:
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("device %s requested but CUDA is not available: running on the CPU", device)
                device = "cpu"
            model = from_pretrained(
                pretrained if pretrained is not None else default_model_path(), device=device, dtype=dtype,
                backend=backend, num_experts_per_tok=num_experts_per_tok,
            )  # fmt: skip
        elif pretrained is not None:
            raise ValueError("give pretrained= or model=, not both")
        if model.tokenizer is None:
            raise ValueError("lm_eval needs a checkpoint with a tokenizer")
        self.model, self.tokenizer = model, model.tokenizer
        self._name = str(pretrained) if pretrained is not None else default_model_path().name
        self._device = model.device
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = max_batch_size or 16
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_positions = model.config.n_positions
        self._max_length = n_positions if max_length is None else int(max_length)
        if not 1 < self._max_length <= n_positions:
            raise ValueError(f"max_length must be in [2, n_positions={n_positions}], got {max_length}")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "PhixtralLM":
        """A PhixtralLM from lm_eval's model_args string "pretrained=DIR,dtype=float32" (see create_from_arg_obj)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "PhixtralLM":
        """A PhixtralLM from model_args and lm_eval's own batch_size / max_batch_size / device (those not None).

        A name that is no argument of PhixtralLM is a TypeError naming it, the closest argument and all of them.
        """
        try:
            given = set(arg_dict) | {k for k, v in (additional_config or {}).items() if v is not None}
            names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
            unknown = sorted(given - set(names))
            if unknown:
                close = difflib.get_close_matches(unknown[0], names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"model_args: phixtral takes no argument {unknown[0]!r}{hint}; it takes {', '.join(names)}"
                )
            return super().create_from_arg_obj(arg_dict, additional_config)
        except _MODEL_ARGS_ERRORS as e:
            e.from_model_args = True  # for main()
            raise

    # --- what TemplateLM asks for -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.model.eos_token_ids[0]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer(string, add_special_tokens=special, verbose=False)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return decode_text(self.tokenizer, tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # --- scoring ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether
        greedy decoding would produce it), in request order. The context is cut on the left to fit max_length."""
        results: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        bar = tqdm(total=len(requests), desc="phixtral loglikelihood", disable=disable_tqdm or None)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError("empty continuation: nothing to score")
                if len(continuation) > self.max_length:
                    raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
                whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
                rows.append((whole[:-1], list(continuation)))
            T = max(len(inp) for inp, _ in rows)
            # Right padding: causal attention keeps every real position blind to the pads after it.
            ids = torch.tensor(
                [inp + [self.eot_token_id] * (T - len(inp)) for inp, _ in rows], device=self.model.device
            )
            logprobs = F.log_softmax(self.model(ids), dim=-1)  # [B, T, V] fp32
            for b, (i, (inp, cont)) in enumerate(zip(chunk, rows)):
                n = len(cont)
                lp = logprobs[b, len(inp) - n : len(inp)]  # [n, V]: the predictions of the continuation's tokens
                target = torch.tensor(cont, device=lp.device)
                answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, in windows of max_length tokens, each token predicted once, the first
        after the prefix (eos) token."""
        windows, owner = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            ):  # fmt: skip
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for idx, (ll, _) in zip(owner, scores):
            totals[idx] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, until one of its `until` strings (left out) or eos, batched among
        requests with the same gen_kwargs."""
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="phixtral generate_until", disable=disable_tqdm or None)
        for members in groups.values():
            settings = self._generation_settings(requests[members[0]].args[1])
            encoded = {i: self.tok_encode(requests[i].args[0]) for i in members}
            members.sort(key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([encoded[i] for i in chunk], **settings)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generation_settings(self, gen_kwargs) -> dict:
        kwargs = dict(gen_kwargs or {})
        for key in sorted(kwargs.keys() - _GEN_KWARGS):
            if key not in self._warned:
                self._warned.add(key)
                log.warning("generate_until: gen_kwargs %r is not supported by phixtral and is ignored", key)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sampled = bool(kwargs.get("do_sample", False))  # greedy unless the task asks to sample, as transformers
        settings = {
            "stop": [s for s in until if s],
            "max_new_tokens": int(kwargs.get("max_gen_toks", self.max_gen_toks)),
        }
        if sampled:
            settings.update(temperature=float(kwargs.get("temperature", 1.0)), top_p=kwargs.get("top_p"),
                            top_k=kwargs.get("top_k"), seed=kwargs.get("seed"))  # fmt: skip
        if "repetition_penalty" in kwargs:
            settings["repetition_penalty"] = float(kwargs["repetition_penalty"])
        return settings

    def _generate(self, contexts: list[list[int]], *, stop: list[str], max_new_tokens: int, **sampling) -> list[str]:
        budget = self.max_length - max_new_tokens  # context tokens kept, from the right
        if budget < 1:
            raise ValueError(
                f"max_gen_toks={max_new_tokens} leaves no room for a context in max_length={self.max_length}"
            )
        ids, mask = left_pad([c[-budget:] if c else [self.prefix_token_id] for c in contexts], self.eot_token_id)
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, stop=stop or None, **sampling
        )
        eos = set(self.model.eos_token_ids)
        return [row_text(self.tok_decode, new, eos, stop) for new in out[:, ids.shape[1] :].tolist()]


def main(argv=None) -> int:
    """lm_eval's command line with the `phixtral` model registered. A model that cannot be built from --model_args is
    one line on stderr, "phixtral lm_eval: error: ...", and exit 2 (a name that is no argument) or 1 (a failed load)."""
    import lm_eval.__main__

    import phixtral.integrations.lm_eval  # noqa: F401  the registered copy when this file runs as __main__

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        lm_eval.__main__.cli_evaluate()
    except _MODEL_ARGS_ERRORS as e:
        if not getattr(e, "from_model_args", False):
            raise
        print(f"phixtral lm_eval: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, TypeError) else 1
    return 0


def _register() -> None:
    import lm_eval.models  # noqa: F401  lm_eval fills its own table only when it is empty: fill it first
    from lm_eval.api.registry import register_model

    register_model("phixtral")(PhixtralLM)


if __name__ == "__main__":
    sys.exit(main())
else:
    _register()
