"""The retriever service: real BM25 and dense (packaged MiniLM, offline) indexes over a small
corpus, served by uvicorn on localhost and queried over real HTTP."""

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["HF_HUB_OFFLINE"] = "1"  # the encoder is a local directory: nothing may be downloaded

import httpx
import pytest

from at2po.retriever import (
    Retriever,
    add_cli,
    build_index,
    create_app,
    load_retriever,
    packaged_minilm_path,
    serve_in_thread,
)
from at2po.tools import HTTPSearchTool, LocalSearchTool

PASSAGES = {
    "eiffel": ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, completed in 1889 for the World's Fair."),
    "wall": ("Great Wall of China", "The Great Wall of China is a series of fortifications built across the historical northern borders of ancient Chinese states."),
    "python": ("Python (programming language)", "Python is a high-level programming language created by Guido van Rossum and first released in 1991."),
    "everest": ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal sub-range of the Himalayas."),
    "amazon": ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of water in the world."),
    "curie": ("Marie Curie", "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering research on radioactivity."),
    "shakespeare": ("William Shakespeare", "William Shakespeare was an English playwright and poet, widely regarded as the greatest writer in the English language; he wrote Hamlet."),
    "photosynthesis": ("Photosynthesis", "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to produce glucose and oxygen."),
    "jupiter": ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System, a gas giant with a Great Red Spot storm."),
    "mona": ("Mona Lisa", "The Mona Lisa is a half-length portrait painting by the Italian artist Leonardo da Vinci, displayed at the Louvre."),
    "titanic": ("RMS Titanic", "RMS Titanic was a British passenger liner that sank in the North Atlantic Ocean in April 1912 after striking an iceberg."),
    "dna": ("DNA", "Deoxyribonucleic acid is a molecule composed of two chains that coil around each other to form a double helix carrying genetic instructions."),
    "olympics": ("Olympic Games", "The modern Olympic Games are leading international sporting events, first held in Athens in 1896."),
    "penicillin": ("Penicillin", "Penicillin, discovered by Alexander Fleming in 1928, was one of the first antibiotics used to treat bacterial infections."),
    "moon": ("Apollo 11", "Apollo 11 was the spaceflight that first landed humans on the Moon; Neil Armstrong stepped onto the lunar surface in July 1969."),
    "sahara": ("Sahara", "The Sahara is a desert spanning North Africa and the largest hot desert in the world."),
    "beethoven": ("Ludwig van Beethoven", "Ludwig van Beethoven was a German composer and pianist who wrote nine symphonies and continued composing after losing his hearing."),
    "internet": ("World Wide Web", "The World Wide Web was invented by Tim Berners-Lee at CERN in 1989 as an information system of linked hypertext documents."),
    "kangaroo": ("Kangaroo", "The kangaroo is a marsupial native to Australia that moves by hopping on its powerful hind legs."),
    "tokyo": ("Tokyo", "Tokyo is the capital of Japan and one of the most populous metropolitan areas in the world."),
    "einstein": ("Albert Einstein", "Albert Einstein was a German-born theoretical physicist who developed the theory of relativity and the equation E = mc2."),
    "coffee": ("Coffee", "Coffee is a brewed drink prepared from roasted coffee beans, the seeds of berries from Coffea plants, and contains caffeine."),
    "volcano": ("Mount Vesuvius", "Mount Vesuvius is a volcano near Naples in Italy whose eruption in 79 AD buried the Roman city of Pompeii."),
    "chess": ("Chess", "Chess is a board game for two players played on a checkered board with 64 squares; the goal is to checkmate the opposing king."),
    "bitcoin": ("Bitcoin", "Bitcoin is a decentralised digital currency introduced in 2009 by the pseudonymous developer Satoshi Nakamoto."),
    "nile": ("Nile", "The Nile is a major north-flowing river in northeastern Africa that drains into the Mediterranean Sea through Egypt."),
    "gravity": ("Isaac Newton", "Isaac Newton formulated the laws of motion and universal gravitation in his book Principia Mathematica, published in 1687."),
    "piano": ("Piano", "The piano is a keyboard instrument in which felt-covered hammers strike strings when the keys are pressed."),
    "antarctica": ("Antarctica", "Antarctica is Earth's southernmost continent, containing the geographic South Pole, and is almost entirely covered by ice."),
    "vaccine": ("Edward Jenner", "Edward Jenner pioneered the smallpox vaccine in 1796 by inoculating a boy with material from cowpox blisters."),
    "pyramids": ("Great Pyramid of Giza", "The Great Pyramid of Giza is the oldest of the Seven Wonders of the Ancient World, built as a tomb for the pharaoh Khufu."),
    "football": ("FIFA World Cup", "The FIFA World Cup is an international association football competition contested by men's national teams every four years."),
    "honey": ("Honey bee", "Honey bees are social insects that live in colonies and produce honey and beeswax from the nectar of flowers."),
    "telephone": ("Telephone", "Alexander Graham Bell was awarded the first United States patent for the telephone in 1876."),
    "rome": ("Colosseum", "The Colosseum is an oval amphitheatre in the centre of Rome, Italy, where gladiators once fought before crowds."),
    "oxygen": ("Oxygen", "Oxygen is the chemical element with symbol O and atomic number 8, essential for respiration in most living organisms."),
    "whale": ("Blue whale", "The blue whale is a marine mammal and the largest animal known ever to have existed, reaching up to 30 metres long."),
    "guitar": ("Electric guitar", "The electric guitar uses pickups to convert the vibration of its steel strings into electrical signals sent to an amplifier."),
    "bread": ("Bread", "Bread is a staple food prepared from a dough of flour and water, usually leavened with yeast and baked in an oven."),
    "lightning": ("Lightning", "Lightning is a natural electrostatic discharge during a thunderstorm, producing a bright flash followed by thunder."),
    "mars": ("Mars", "Mars is the fourth planet from the Sun, often called the Red Planet because of the iron oxide on its surface."),
    "samurai": ("Samurai", "The samurai were the hereditary military nobility of medieval and early-modern Japan who followed the code of bushido."),
    "tea": ("Tea", "Tea is an aromatic beverage made by pouring hot water over cured leaves of Camellia sinensis, an evergreen shrub native to East Asia."),
    "bicycle": ("Bicycle", "A bicycle is a human-powered, pedal-driven vehicle with two wheels attached to a frame, one behind the other."),
    "vikings": ("Vikings", "The Vikings were seafaring Norse people from Scandinavia who raided and settled across Europe from the late eighth century."),
    "printing": ("Printing press", "Johannes Gutenberg introduced the movable-type printing press to Europe around 1440, spreading printed books widely."),
    "rainbow": ("Rainbow", "A rainbow is an optical phenomenon caused by refraction, reflection and dispersion of sunlight in water droplets."),
    "penguin": ("Emperor penguin", "The emperor penguin is the tallest and heaviest of all living penguin species and breeds during the Antarctic winter."),
    "chocolate": ("Chocolate", "Chocolate is a food made from roasted and ground cacao seeds, often sweetened with sugar."),
    "lighthouse": ("Lighthouse", "A lighthouse is a tower with a bright lamp that guides ships at sea and warns them of dangerous coastlines."),
}

# Keyword queries: BM25 must put the passage first.
KEYWORD_QUERIES = {
    "Guido van Rossum programming language": "python",
    "Marie Curie radioactivity": "curie",
    "Titanic iceberg 1912": "titanic",
    "Gutenberg printing press": "printing",
    "Satoshi Nakamoto digital currency": "bitcoin",
    "Vesuvius Pompeii eruption": "volcano",
}

# Paraphrases sharing few words with the passage: the dense encoder must put it first.
SEMANTIC_QUERIES = {
    "tall iron landmark in the French capital": "eiffel",
    "who discovered the first antibiotic medicine": "penicillin",
    "the first people to walk on the lunar surface": "moon",
    "biggest creature ever living in the ocean": "whale",
    "how do plants make food from sunlight": "photosynthesis",
    "Scandinavian sea raiders in the Middle Ages": "vikings",
    "which planet looks red": "mars",
    "the composer who went deaf": "beethoven",
}


def _first_id(hits: list[dict]) -> str:
    return hits[0]["id"] if hits else "<none>"


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, (title, text) in PASSAGES.items():
            f.write(json.dumps({"id": doc_id, "contents": f'"{title}"\n{text}'}) + "\n")
    return path


@pytest.fixture(scope="module")
def bm25_dir(corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bm25")
    build_index(corpus_path, out, kind="bm25", progress=False)
    return out


@pytest.fixture(scope="module")
def dense_dir(corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    build_index(corpus_path, out, kind="dense", encoder=packaged_minilm_path(), progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def dense(dense_dir):
    return load_retriever(dense_dir, device="cpu")


@pytest.fixture(scope="module")
def server(dense):
    with serve_in_thread(create_app(dense, max_batch=32)) as url:
        yield url


# --- indexes ----------------------------------------------------------------------------------


def test_packaged_encoder_is_found():
    path = packaged_minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_bm25_ranks_the_expected_passage_first(bm25_dir):
    retriever = load_retriever(bm25_dir)
    assert retriever.kind == "bm25" and retriever.n_docs == len(PASSAGES)
    hits = retriever.search(list(KEYWORD_QUERIES), topk=3)
    assert [_first_id(h) for h in hits] == list(KEYWORD_QUERIES.values())
    first = hits[0][0]
    assert set(first) == {"id", "contents", "score"}
    assert first["contents"].startswith('"Python (programming language)"') and first["score"] > 0
    assert all(len(h) <= 3 and [x["score"] for x in h] == sorted((x["score"] for x in h), reverse=True) for h in hits)
    assert retriever.search(["the of and"], topk=3) == [[]]  # only stop words: nothing to rank by


def test_bm25_index_dir_is_a_local_search_tool_index(bm25_dir):
    tool = LocalSearchTool(index_dir=bm25_dir, topk=1)
    assert tool.run("Marie Curie radioactivity").text.startswith('Page 1: "Marie Curie"')


def test_dense_ranks_the_expected_passage_first(dense, dense_dir):
    assert dense.kind == "dense" and dense.n_docs == len(PASSAGES)
    hits = dense.search(list(SEMANTIC_QUERIES), topk=5)
    assert [_first_id(h) for h in hits] == list(SEMANTIC_QUERIES.values())
    assert all(len(h) == 5 for h in hits)
    assert 0 < hits[0][0]["score"] <= 1.0 + 1e-5  # cosine: normalised embeddings
    assert len(dense.search(["anything"], topk=1000)[0]) == len(PASSAGES)  # topk beyond the corpus
    meta = json.loads((dense_dir / "meta.json").read_text())
    assert meta["kind"] == "dense" and meta["n_docs"] == len(PASSAGES) and meta["dim"] == 384
    assert meta["encoder"] == str(packaged_minilm_path()) and meta["normalize"] is True
    assert meta["build_seconds"] > 0


def test_dense_prefixes_are_recorded_and_applied(corpus_path, dense, tmp_path):
    build_index(
        corpus_path, tmp_path, kind="dense", encoder=packaged_minilm_path(),
        query_prefix="query: ", passage_prefix="passage: ", progress=False, device="cpu",
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["query_prefix"], meta["passage_prefix"]) == ("query: ", "passage: ")
    retriever = load_retriever(tmp_path, device="cpu")
    queries = list(SEMANTIC_QUERIES)[:3]
    assert [_first_id(h) for h in retriever.search(queries, 1)] == list(SEMANTIC_QUERIES.values())[:3]
    # The same model without prefixes (the `dense` fixture) scores the same pair differently.
    assert dense.meta["query_prefix"] == ""
    assert retriever.search(queries[:1], 1)[0][0]["score"] != pytest.approx(dense.search(queries[:1], 1)[0][0]["score"])


def test_build_and_load_errors(corpus_path, bm25_dir, tmp_path):
    with pytest.raises(ValueError, match="needs an encoder"):
        build_index(corpus_path, tmp_path, kind="dense", progress=False)
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(corpus_path, tmp_path, kind="splade", progress=False)
    with pytest.raises(FileNotFoundError, match="not a retriever index"):
        load_retriever(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "contents": "ok"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'contents'"):
        build_index(bad, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        load_retriever(bm25_dir).search(["x"], 0)


def test_an_index_of_another_format_or_a_damaged_description_is_refused(bm25_dir, tmp_path):
    """A meta.json of format_version 99 was served as if it were ours; a damaged one raised a
    JSON traceback."""
    import shutil

    index = shutil.copytree(bm25_dir, tmp_path / "index")
    meta = json.loads((index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"meta.json: index format_version 99, this at2po reads 1; rebuild"):
        load_retriever(index)
    (index / "meta.json").write_text('{"kind": "bm25", ')
    with pytest.raises(ValueError, match=r"meta.json: not a readable index description .*; rebuild"):
        load_retriever(index)


def test_an_index_whose_docs_file_was_cut_short_is_refused_at_load(bm25_dir, tmp_path):
    """docs.jsonl cut at a line break loaded; hits past its end failed as "list index out of range"
    (counted by at2po eval as the model's bad queries) and `retriever serve` answered /health, then
    500s."""
    import shutil
    import socket
    import subprocess
    import sys

    index = shutil.copytree(bm25_dir, tmp_path / "index")
    lines = (index / "docs.jsonl").read_text().splitlines(keepends=True)
    (index / "docs.jsonl").write_text("".join(lines[:2]))
    message = rf"index: docs.jsonl holds 2 passages but the BM25 index {len(lines)} \(docs.jsonl was cut short"
    with pytest.raises(ValueError, match=message):
        load_retriever(index)
    with pytest.raises(ValueError, match=message):
        LocalSearchTool(index_dir=index)
    with socket.socket() as s:  # a free port: the server must not get as far as listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.run([sys.executable, "-m", "at2po.cli", "retriever", "serve", "--index", str(index),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and "Traceback" not in serve.stderr, serve.stderr
    assert "docs.jsonl holds 2 passages but the BM25 index" in serve.stderr.splitlines()[-1]


def test_build_refuses_a_directory_of_other_files_and_rebuilds_an_index_in_place(corpus_path, bm25_dir, tmp_path):
    """`retriever build --out DIR` replaced the user's own docs.jsonl in an existing folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "docs.jsonl").write_text("the user's file\n")
    with pytest.raises(ValueError, match=r"--out .*mine holds files and no retriever index \(meta.json\)"):
        build_index(corpus_path, mine, progress=False)
    assert (mine / "docs.jsonl").read_text() == "the user's file\n" and len(list(mine.iterdir())) == 1
    build_index(corpus_path, tmp_path / "new", progress=False)  # a new directory
    build_index(corpus_path, tmp_path / "new", progress=False)  # an index, rebuilt in place
    assert load_retriever(tmp_path / "new").search(["x"], 1)


# --- server -----------------------------------------------------------------------------------


def test_http_search_tool_gets_pages_through_the_server(server):
    tool = HTTPSearchTool(server, topk=3)
    result = tool.run("tall iron landmark in the French capital")
    assert result.ok
    lines = result.text.split("\n")
    assert len(lines) == 3 and [line.split(":")[0] for line in lines] == ["Page 1", "Page 2", "Page 3"]
    assert lines[0].startswith('Page 1: "Eiffel Tower" The Eiffel Tower is a wrought-iron')
    batch = tool.batch_search(["which planet looks red", "", "the composer who went deaf"])
    assert batch[0].text.startswith('Page 1: "Mars"') and not batch[1].ok
    assert batch[2].text.startswith('Page 1: "Ludwig van Beethoven"')


def test_retrieve_speaks_search_r1_format(server):
    payload = {"queries": ["which planet looks red", "Scandinavian sea raiders in the Middle Ages"], "topk": 2, "return_scores": True}
    body = httpx.post(f"{server}/retrieve", json=payload).json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    hit = body["result"][0][0]
    assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
    assert hit["document"]["id"] == "mars" and isinstance(hit["score"], float)
    assert [len(r) for r in body["result"]] == [2, 2]
    # Without return_scores (Search-R1's default) a hit is the bare document; topk defaults to 3.
    bare = httpx.post(f"{server}/retrieve", json={"queries": ["which planet looks red"]}).json()
    assert len(bare["result"][0]) == 3 and bare["result"][0][0] == hit["document"]


def test_health(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "kind": "dense", "n_docs": len(PASSAGES)}


def test_concurrent_requests_all_answered_correctly(server):
    queries = list(SEMANTIC_QUERIES.items()) * 2
    tool = HTTPSearchTool(server, topk=1)

    def ask(item):
        query, expected = item
        if len(query) % 2:  # half through the tool, half as raw JSON
            return tool.run(query).text.startswith(f'Page 1: "{PASSAGES[expected][0]}"')
        hits = httpx.post(f"{server}/retrieve", json={"queries": [query], "topk": 1, "return_scores": True}).json()
        return hits["result"][0][0]["document"]["id"] == expected

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(ask, queries))


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"queries": ["a"], "topk": 0}', 422, "topk: Input should be greater than or equal to 1"),
        (b'{"queries": ["a"], "topk": 100000}', 422, "topk 100000 is too large"),
        (b"this is not json", 422, "not valid JSON"),
        (b'{"queries": "a single string"}', 422, "queries: Input should be a valid list"),
        (b'{"queries": ["a", 7]}', 422, "queries.1: Input should be a valid string"),
        (b'{"queries": ["a"], "topk": "3"}', 422, "topk: Input should be a valid integer"),
        (b'{"queries": ["a"], "return_scores": "yes"}', 422, "return_scores: Input should be a valid boolean"),
        (b'["a", "b"]', 422, "body: Input should be a valid dictionary"),
        (json.dumps({"queries": ["q"] * 33}).encode(), 413, "too many queries: 33 in one request, at most 32"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_up(server, body, status, message):
    response = httpx.post(f"{server}/retrieve", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200
    ok = httpx.post(f"{server}/retrieve", json={"queries": ["which planet looks red"], "topk": 1})
    assert ok.json()["result"][0][0]["id"] == "mars"


class _Recording(Retriever):
    """A real BM25 retriever that records the batches it is called with and fails on "boom"."""

    kind = "bm25"

    def __init__(self, inner: Retriever) -> None:
        super().__init__(inner.ids, inner.contents, inner.meta)
        self.inner = inner
        self.calls: list[int] = []

    def _search(self, queries, topk):
        if "boom" in queries:
            raise RuntimeError("index file is corrupt")
        self.calls.append(len(queries))
        time.sleep(0.05)  # a slow first call lets the other requests queue up behind it
        return self.inner._search(queries, topk)


def test_requests_arriving_together_are_merged_and_failures_are_contained(bm25_dir):
    recording = _Recording(load_retriever(bm25_dir))
    items = list(KEYWORD_QUERIES.items()) * 3  # 18 requests
    barrier = threading.Barrier(len(items))
    with serve_in_thread(create_app(recording)) as url, httpx.Client() as client:
        def ask(item):
            query, expected = item
            barrier.wait()
            response = client.post(f"{url}/retrieve", json={"queries": [query], "topk": 2, "return_scores": True})
            return response.json()["result"][0][0]["document"]["id"] == expected

        with ThreadPoolExecutor(len(items)) as pool:
            assert all(pool.map(ask, items))
        assert sum(recording.calls) == len(items)
        assert len(recording.calls) < len(items)  # some requests shared a retriever call

        failed = client.post(f"{url}/retrieve", json={"queries": ["boom"]})
        assert failed.status_code == 500 and "index file is corrupt" in failed.json()["detail"]
        assert client.post(f"{url}/retrieve", json={"queries": ["Titanic iceberg"], "topk": 1}).json()["result"][0][0]["id"] == "titanic"


def test_cli_builds_an_index(corpus_path, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="at2po")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["retriever", "build", "--corpus", str(corpus_path), "--out", str(tmp_path), "--kind", "bm25"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["kind"] == "bm25"
    serve_args = parser.parse_args(["retriever", "serve", "--index", str(tmp_path), "--port", "9001"])
    assert (serve_args.host, serve_args.port, serve_args.topk) == ("127.0.0.1", 9001, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["retriever", "build", "--help"])
    assert "--passage-prefix" in capsys.readouterr().out
