"""Source: real Git repositories fetched through gitpython (file:// and local paths)."""

from __future__ import annotations

from pathlib import Path

import git
import pytest

from reconciler.source import SourceError, fetch, is_git_url, ls_remote, redact


def make_repo(path: Path) -> git.Repo:
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    return repo


def commit(repo: git.Repo, files: dict[str, str], msg: str) -> str:
    root = Path(repo.working_tree_dir or ".")
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        repo.index.add([name])
    return str(repo.index.commit(msg).hexsha)


def test_branch_tag_and_commit_are_checked_out_exactly(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    first = commit(repo, {"a.yaml": "one\n"}, "first")
    repo.create_tag("v1")
    second = commit(repo, {"a.yaml": "two\n", "b.yaml": "b\n"}, "second")
    cache = tmp_path / "cache"

    co = fetch(str(tmp_path / "origin"), "main", cache_dir=cache)
    assert co.revision == second
    assert (co.path / "a.yaml").read_text() == "two\n"

    co = fetch((tmp_path / "origin").as_uri(), "v1", cache_dir=cache)
    assert co.revision == first
    assert (co.path / "a.yaml").read_text() == "one\n"
    assert not (co.path / "b.yaml").exists(), "files of another revision must not linger"

    co = fetch(str(tmp_path / "origin"), first, cache_dir=cache)
    assert co.revision == first


def test_new_commit_is_seen_on_the_next_fetch(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    commit(repo, {"a.yaml": "one\n"}, "first")
    cache = tmp_path / "cache"
    before = fetch(str(tmp_path / "origin"), "main", cache_dir=cache).revision
    after_commit = commit(repo, {"a.yaml": "two\n"}, "second")
    co = fetch(str(tmp_path / "origin"), "main", cache_dir=cache)
    assert before != co.revision == after_commit
    assert (co.path / "a.yaml").read_text() == "two\n"


def test_fetch_is_shallow(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    for i in range(5):
        commit(repo, {"a.yaml": f"{i}\n"}, f"c{i}")
    co = fetch((tmp_path / "origin").as_uri(), "main", cache_dir=tmp_path / "cache")
    assert len(list(git.Repo(co.path).iter_commits("HEAD"))) == 1


def test_unknown_ref_names_ref_and_url(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    commit(repo, {"a.yaml": "x\n"}, "first")
    with pytest.raises(SourceError, match=r"cannot fetch 'nope' from .*origin"):
        fetch(str(tmp_path / "origin"), "nope", cache_dir=tmp_path / "cache")


def exception_texts(exc: BaseException | None) -> str:
    """str() of an exception and of everything chained to it (cause and context)."""
    out = []
    while exc is not None:
        out.append(f"{exc!s} {exc!r}")
        if isinstance(exc, git.GitCommandError):
            out.append(f"{exc.command!r} {exc.stderr!r} {exc.stdout!r}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def test_unreachable_repository_is_a_clear_error_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        fetch("https://user:s3cret@127.0.0.1:9/none.git", "main", cache_dir=tmp_path / "c")
    assert "s3cret" not in exception_texts(err.value)
    # credentials are taken out of the URL before git sees it: the error names the bare URL
    assert "from https://127.0.0.1:9/none.git:" in str(err.value)
    assert "127.0.0.1 port 9" in str(err.value)
    config = (next((tmp_path / "c").iterdir()) / ".git" / "config").read_text()
    assert "s3cret" not in config and "https://127.0.0.1:9/none.git" in config


def test_redact_and_url_detection(tmp_path: Path) -> None:
    assert redact("clone https://x-access-token:abc@github.com/o/r failed") == (
        "clone https://***@github.com/o/r failed"
    )
    assert is_git_url("git@github.com:o/r.git")
    assert is_git_url("https://example.com/r.git")
    assert not is_git_url(str(tmp_path))
    make_repo(tmp_path / "r")
    assert is_git_url(str(tmp_path / "r"))


def test_ls_remote_tells_the_head_without_fetching(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    first = commit(repo, {"a.yaml": "one\n"}, "first")
    repo.create_tag("v1", message="annotated")  # annotated: ls-remote must peel to the commit
    repo.create_tag("light")
    second = commit(repo, {"a.yaml": "two\n"}, "second")
    repo.create_head("release", first)
    url = (tmp_path / "origin").as_uri()

    assert ls_remote(url, "main") == second
    assert ls_remote(str(tmp_path / "origin"), "main") == second
    assert ls_remote(url, "v1") == first
    assert repo.tags["v1"].tag is not None and repo.tags["v1"].tag.hexsha != first
    assert ls_remote(url, "light") == first
    assert ls_remote(url, "release") == first
    assert ls_remote(url, "refs/heads/main") == second
    assert ls_remote(url, "refs/tags/v1") == first
    assert ls_remote(url, second) == second, "a pinned commit never moves"
    assert ls_remote(url, second[:10]) is None, "an abbreviated SHA needs a fetch"
    third = commit(repo, {"a.yaml": "three\n"}, "third")
    assert ls_remote(url, "main") == third
    with pytest.raises(SourceError, match=r"ref 'nope' not found on file://.*origin"):
        ls_remote(url, "nope")
    with pytest.raises(SourceError, match=r"cannot list 'main' on file://.*missing"):
        ls_remote((tmp_path / "missing").as_uri(), "main")


def test_branch_wins_over_tag_of_the_same_name_in_fetch_and_ls_remote(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    first = commit(repo, {"a.yaml": "one\n"}, "first")
    repo.create_tag("prod")
    second = commit(repo, {"a.yaml": "two\n"}, "second")
    repo.create_head("prod", second)
    url = (tmp_path / "origin").as_uri()
    assert ls_remote(url, "prod") == second != first
    assert fetch(url, "prod", cache_dir=tmp_path / "c").revision == second


def test_changed_is_false_when_the_head_did_not_move(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    commit(repo, {"a.yaml": "one\n"}, "first")
    cache = tmp_path / "cache"
    url = str(tmp_path / "origin")
    assert fetch(url, "main", cache_dir=cache).changed
    again = fetch(url, "main", cache_dir=cache)
    assert not again.changed
    # a stray edit in the cache work tree is undone even when nothing moved
    (again.path / "a.yaml").write_text("edited\n")
    (again.path / "stray.yaml").write_text("x\n")
    co = fetch(url, "main", cache_dir=cache)
    assert not co.changed
    assert (co.path / "a.yaml").read_text() == "one\n"
    assert not (co.path / "stray.yaml").exists()
    commit(repo, {"a.yaml": "two\n"}, "second")
    assert fetch(url, "main", cache_dir=cache).changed


def test_plain_directory_is_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.yaml").write_text("x\n")
    co = fetch(str(tmp_path / "plain"), "main", cache_dir=tmp_path / "c")
    assert (co.path, co.revision) == ((tmp_path / "plain").resolve(), "local")
    assert not (tmp_path / "c").exists()
    assert ls_remote(str(tmp_path / "plain"), "main") is None


def test_short_commit_sha_is_resolved(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "origin")
    first = commit(repo, {"a.yaml": "one\n"}, "first")
    commit(repo, {"a.yaml": "two\n"}, "second")
    co = fetch((tmp_path / "origin").as_uri(), first[:10], cache_dir=tmp_path / "c")
    assert co.revision == first
    assert (co.path / "a.yaml").read_text() == "one\n"
    with pytest.raises(SourceError, match=r"commit 0123456789 not found in file://"):
        fetch((tmp_path / "origin").as_uri(), "0123456789", cache_dir=tmp_path / "c")
