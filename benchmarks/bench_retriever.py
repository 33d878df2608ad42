"""Retriever index build time and query throughput, BM25 and dense (packaged all-MiniLM-L6-v2).

    python benchmarks/bench_retriever.py                     # 10k passages, CPU
    python benchmarks/bench_retriever.py --device cuda       # dense encoder on a GPU

The corpus is synthetic: passages of 100 words drawn at random from the encoder's whole-word
vocabulary (wiki-18 passages are 100 words; one token a word here), each query 6 words of one
passage, so recall@1 is printed as a sanity check of BM25 beside the timings (such bags of random
words mean little to a sentence encoder, so the dense recall here is low by construction; the
tests check dense ranking on real passages).
Queries/s is measured three ways: in-process batches of 64, in-process one query per call, and
over HTTP with 16 concurrent clients sending one query each (the server merges them).
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

from at2po.retriever import build_index, create_app, load_retriever, packaged_minilm_path, serve_in_thread

def make_corpus(n_docs: int, n_queries: int, seed: int) -> tuple[list[dict], list[tuple[str, int]]]:
    rng = random.Random(seed)
    tokens = (packaged_minilm_path() / "vocab.txt").read_text(encoding="utf-8").split()
    vocab = sorted({t for t in tokens if t.isascii() and t.isalpha() and len(t) >= 4})
    docs = [{"id": str(i), "contents": " ".join(rng.choices(vocab, k=100))} for i in range(n_docs)]
    queries = []
    for _ in range(n_queries):
        target = rng.randrange(n_docs)
        words = docs[target]["contents"].split()
        queries.append((" ".join(rng.sample(words, 6)), target))
    return docs, queries


def throughput(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bench(kind: str, corpus: Path, work: Path, queries: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    texts = [q for q, _ in queries]
    out = work / kind
    encoder = str(packaged_minilm_path()) if kind == "dense" else None
    meta = build_index(
        corpus, out, kind=kind, encoder=encoder, batch_size=args.batch_size, progress=False, device=args.device
    )
    start = time.perf_counter()
    retriever = load_retriever(out, device=args.device)
    load_s = time.perf_counter() - start
    retriever.search(texts[:8], 3)  # warm-up

    hits: list = []
    batched = throughput(
        lambda: [hits.extend(retriever.search(texts[i : i + 64], 3)) for i in range(0, len(texts), 64)], len(texts)
    )
    recall = sum(bool(h) and h[0]["id"] == str(t) for h, (_, t) in zip(hits, queries)) / len(queries)
    single_n = min(len(texts), 200)
    single = throughput(lambda: [retriever.search([q], 3) for q in texts[:single_n]], single_n)

    with serve_in_thread(create_app(retriever)) as url, httpx.Client(timeout=60) as client:
        def ask(query: str) -> None:
            payload = {"queries": [query], "topk": 3, "return_scores": True}
            client.post(f"{url}/retrieve", json=payload).raise_for_status()

        with ThreadPoolExecutor(16) as pool:
            http = throughput(lambda: list(pool.map(ask, texts)), len(texts))
    return {
        "kind": kind,
        "build_s": meta["build_seconds"],
        "load_s": round(load_s, 2),
        "qps_batch64": round(batched, 1),
        "qps_single": round(single, 1),
        "qps_http_16_clients": round(http, 1),
        "recall@1": round(recall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-docs", type=int, default=10000)
    parser.add_argument("--n-queries", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    parser.add_argument("--batch-size", type=int, default=64, help="dense encoder batch size")
    parser.add_argument("--device", default=None, help="dense encoder device (default: CUDA if available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    docs, queries = make_corpus(args.n_docs, args.n_queries, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        print(f"{args.n_docs} passages, {args.n_queries} queries, {os.cpu_count()} CPUs")
        header = ("kind", "build s", "load s", "q/s batch64", "q/s single", "q/s http x16", "recall@1")
        print(f"{header[0]:<6} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (8, 7, 12, 11, 13, 9))))
        for kind in args.kinds:
            r = bench(kind, corpus, work, queries, args)
            print(
                f"{r['kind']:<6} {r['build_s']:>8.1f} {r['load_s']:>7.2f} {r['qps_batch64']:>12.1f} "
                f"{r['qps_single']:>11.1f} {r['qps_http_16_clients']:>13.1f} {r['recall@1']:>9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
