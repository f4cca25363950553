"""Log-probabilities in OpenAI's two shapes, from the engine's (log p, [(id, log p)]) pairs.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`,
where each top dict holds the k most likely tokens and the sampled one, as vLLM returns it; with
`echo` the prompt's tokens come first (the first one's entries are null, as OpenAI's are).
A token's text is its own decoding (special tokens kept); `bytes` carry its UTF-8 bytes.
"""

from __future__ import annotations


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"     # no tokenizer: the id, so a client still sees which token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat(tokenizer, token_ids: list, logprobs: list) -> dict:
    return {"content": [{**_entry(tokenizer, t, lp), "top_logprobs": [_entry(tokenizer, i, v) for i, v in top]}
                        for t, (lp, top) in zip(token_ids, logprobs)]}


def completion(tokenizer, token_ids: list, logprobs: list, start: int = 0, prompt_ids=None,
               prompt_logprobs=None) -> dict:
    """With `prompt_ids` (echo), the prompt's tokens come first: the first has no logprob (None),
    the others theirs from `prompt_logprobs` (or None where not asked for)."""
    tokens, values, tops, offsets, offset = [], [], [], [], start
    pairs = []
    if prompt_ids is not None:
        scored = list(prompt_logprobs or [])
        pairs += [(t, None) for t in prompt_ids[:1]]
        pairs += [(t, scored[j] if j < len(scored) else None) for j, t in enumerate(prompt_ids[1:])]
    pairs += list(zip(token_ids, logprobs))
    for t, pair in pairs:
        text = token_text(tokenizer, t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if pair is None:
            values.append(None)
            tops.append(None)
            continue
        lp, top = pair
        best = {token_text(tokenizer, i): v for i, v in top}
        best.setdefault(text, lp)
        values.append(lp)
        tops.append(best)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
