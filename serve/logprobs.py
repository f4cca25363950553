"""Log-probabilities in OpenAI's two shapes, from the engine's (log p, [(id, log p)]) pairs.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`,
where each top dict holds the k most likely tokens and the sampled one, as vLLM returns it.
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


def completion(tokenizer, token_ids: list, logprobs: list, start: int = 0) -> dict:
    tokens, offsets, tops, offset = [], [], [], start
    for t, (lp, top) in zip(token_ids, logprobs):
        text = token_text(tokenizer, t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        best = {token_text(tokenizer, i): v for i, v in top}
        best.setdefault(text, lp)
        tops.append(best)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in logprobs], "top_logprobs": tops,
            "text_offset": offsets}
