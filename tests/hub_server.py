"""A small Hugging Face Hub for tests: the HTTP API as ``huggingface_hub`` 2.x calls it (without Xet).

Enough of the Hub to publish and fetch model repositories with the real client: tokens and ``whoami``,
repository creation (public/private, per-namespace write rights), visibility settings, branches and refs,
the preupload / LFS batch / LFS upload / commit sequence, ``resolve`` downloads with the headers the client
caches by (commit, etag, size), tree and paths-info listings, repository info and commit history.

Everything lives in memory. ``serve_hub()`` starts it on 127.0.0.1 (a free port) in a thread and stops it
when the ``with`` block ends. ``HubState.corrupt`` makes downloads of a path return altered bytes under the
right headers, to test that the client side notices, and ``HubState.truncated`` cuts their body off
halfway; ``HubState.frozen_settings`` makes the Hub refuse visibility changes of a repository.
"""
import base64
import hashlib
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'
_REV = r'(?P<rev>[^/]+)'


@dataclass
class FileEntry:
    path: str
    size: int
    blob_key: str  # key into HubState.blobs
    lfs_sha256: Optional[str]  # set for LFS files
    git_oid: str  # git blob sha1 (what the Hub reports as the oid of a regular file)

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.git_oid


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    files: Dict[str, FileEntry]
    author: Optional[str] = None
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: Dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        revision = unquote(revision)
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class HubState:
    tokens: Dict[str, str]  # token -> user name
    orgs: Dict[str, Set[str]]  # organisation -> member user names (all may write)
    repos: Dict[str, Repo] = field(default_factory=dict)
    blobs: Dict[str, bytes] = field(default_factory=dict)
    corrupt: Set[Tuple[str, str]] = field(default_factory=set)  # (repo_id, path) served altered
    truncated: Set[Tuple[str, str]] = field(default_factory=set)  # (repo_id, path) whose body is cut off
    frozen_settings: Set[str] = field(default_factory=set)  # repo_ids whose settings the Hub refuses to change
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: List[str] = field(default_factory=list)  # "METHOD path" log

    def can_write(self, user: Optional[str], repo_id: str) -> bool:
        namespace = repo_id.split('/')[0]
        return user is not None and (user == namespace or user in self.orgs.get(namespace, set()))


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _new_commit_oid(parent: Optional[str], title: str) -> str:
    return hashlib.sha1(f'{parent}{title}{time.time_ns()}'.encode()).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    state: HubState  # set on the subclass made by serve_hub

    # ----------------------------------------------------------------------------------------------- plumbing
    def log_message(self, format, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        if 'chunked' in self.headers.get('Transfer-Encoding', ''):
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_type: str = 'application/json', head: bool = False, length: Optional[int] = None):
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers=headers, head=head)

    def _error(self, status: int, message: str, code: Optional[str] = None, head: bool = False):
        headers = {'X-Error-Message': message}
        if code:
            headers['X-Error-Code'] = code
        self._json(status, {'error': message}, headers=headers, head=head)

    def _user(self) -> Optional[str]:
        auth = self.headers.get('Authorization', '')
        return self.state.tokens.get(auth[len('Bearer '):]) if auth.startswith('Bearer ') else None

    def _base(self) -> str:
        return f'http://{self.headers["Host"]}'

    def _readable_repo(self, repo_id: str, head: bool = False) -> Optional[Repo]:
        """The repo if the caller may read it; otherwise answers like the Hub (401/404 RepoNotFound)."""
        repo = self.state.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and not self.state.can_write(user, repo_id)):
            status = 401 if user is None else 404
            self._error(status, f'Repository Not Found for url: {self.path}.', 'RepoNotFound', head=head)
            return None
        return repo

    def _readable_commit(self, repo_id: str, rev: str) -> Optional[Tuple[Repo, Commit]]:
        """The repo and its commit at ``rev`` if readable; otherwise answers the error and returns None."""
        repo = self._readable_repo(repo_id)
        if repo is None:
            return None
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
            return None
        return repo, commit

    def _route(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append(f'{method} {path}')
        routes = [
            ('GET', r'/api/whoami-v2', self._whoami),
            ('POST', r'/api/repos/create', self._create_repo),
            ('POST', r'/api/validate-yaml', self._validate_yaml),
            ('GET', rf'/api/models/{_REPO}(?:/revision/{_REV})?', self._model_info),
            ('GET', rf'/api/models/{_REPO}/refs', self._refs),
            ('POST', rf'/api/models/{_REPO}/branch/(?P<branch>.+)', self._create_branch),
            ('PUT', rf'/api/models/{_REPO}/settings', self._settings),
            ('GET', rf'/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.*))?', self._tree),
            ('POST', rf'/api/models/{_REPO}/paths-info/{_REV}', self._paths_info),
            ('GET', rf'/api/models/{_REPO}/commits/{_REV}', self._commits),
            ('POST', rf'/api/models/{_REPO}/preupload/{_REV}', self._preupload),
            ('POST', rf'/api/models/{_REPO}/commit/{_REV}', self._commit),
            ('POST', rf'/{_REPO}\.git/info/lfs/objects/batch', self._lfs_batch),
            ('PUT', r'/_lfs/(?P<oid>[0-9a-f]{64})', self._lfs_put),
            ('POST', r'/_lfs/(?P<oid>[0-9a-f]{64})/verify', self._lfs_verify),
            ('HEAD', rf'/{_REPO}/resolve/{_REV}/(?P<file>.+)', self._resolve),
            ('GET', rf'/{_REPO}/resolve/{_REV}/(?P<file>.+)', self._resolve),
        ]
        for route_method, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if m and route_method == method:
                return handler(query=query, head=method == 'HEAD', **{k: v for k, v in m.groupdict().items()})
        self._body()
        self._error(404, f'no route for {method} {path}', head=method == 'HEAD')

    def do_GET(self):
        self._route('GET')

    def do_HEAD(self):
        self._route('HEAD')

    def do_POST(self):
        self._route('POST')

    def do_PUT(self):
        self._route('PUT')

    # ----------------------------------------------------------------------------------------------- endpoints
    def _whoami(self, query, head):
        user = self._user()
        if user is None:
            return self._error(401, 'Invalid credentials in Authorization header')
        orgs = [{'name': org, 'type': 'org'} for org, members in self.state.orgs.items() if user in members]
        self._json(200, {'type': 'user', 'name': user, 'orgs': orgs,
                         'auth': {'type': 'access_token', 'accessToken': {'displayName': 'test', 'role': 'write'}}})

    def _create_repo(self, query, head):
        payload = json.loads(self._body() or b'{}')
        user = self._user()
        if user is None:
            return self._error(401, 'You must be authenticated to create a repository')
        if payload.get('type', 'model') != 'model':
            return self._error(400, 'only model repositories are served here')
        repo_id = f'{payload.get("organization") or user}/{payload["name"]}'
        url = f'{self._base()}/{repo_id}'
        if not self.state.can_write(user, repo_id):
            return self._error(403, f'You don\'t have the rights to create a model under the namespace '
                                    f'"{repo_id.split("/")[0]}"')
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {'error': 'You already created this model repo', 'url': url})
            private = payload.get('private', payload.get('visibility') == 'private')
            repo = Repo(repo_id=repo_id, private=bool(private))
            root = Commit(oid=_new_commit_oid(None, 'initial commit'), parent=None, title='initial commit', files={})
            repo.commits[root.oid] = root
            repo.branches['main'] = root.oid
            self.state.repos[repo_id] = repo
        self._json(200, {'url': url, 'name': repo_id})

    def _validate_yaml(self, query, head):
        self._body()
        self._json(200, {'errors': [], 'warnings': []})

    def _model_info(self, query, head, repo, rev=None):
        found = self._readable_commit(repo, rev or 'main')
        if found is None:
            return
        repo_obj, commit = found
        self._json(200, {
            'id': repo, 'modelId': repo, 'sha': commit.oid, 'private': repo_obj.private,
            'siblings': [{'rfilename': p} for p in sorted(commit.files)],
            'lastModified': time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(commit.date)),
            'tags': [], 'downloads': 0, 'likes': 0,
        })

    def _refs(self, query, head, repo):
        repo_obj = self._readable_repo(repo)
        if repo_obj is None:
            return
        branches = [{'name': b, 'ref': f'refs/heads/{b}', 'targetCommit': oid} for b, oid in repo_obj.branches.items()]
        self._json(200, {'branches': branches, 'tags': [], 'converts': [], 'pullRequests': []})

    def _create_branch(self, query, head, repo, branch):
        payload = json.loads(self._body() or b'{}')
        if not self.state.can_write(self._user(), repo):
            return self._error(403, f'You don\'t have the rights to write to {repo}')
        repo_obj = self._readable_repo(repo)
        if repo_obj is None:
            return
        with self.state.lock:
            if branch in repo_obj.branches:
                return self._error(409, f'Reference refs/heads/{branch} already exists')
            start = repo_obj.resolve(payload.get('startingPoint') or 'main')
            if start is None:
                return self._error(404, 'Invalid starting point', 'RevisionNotFound')
            repo_obj.branches[branch] = start.oid
        self._json(200, {})

    def _settings(self, query, head, repo):
        payload = json.loads(self._body() or b'{}')
        repo_obj = self._writable_repo(repo)
        if repo_obj is None:
            return
        if repo in self.state.frozen_settings:
            return self._error(403, f'The settings of {repo} cannot be changed by this token')
        visibility = payload.get('visibility')
        if visibility is None and isinstance(payload.get('private'), bool):  # huggingface_hub < 2 sends this form
            visibility = 'private' if payload['private'] else 'public'
        if visibility not in (None, 'public', 'private'):
            return self._error(400, f'invalid visibility {visibility!r}')
        if visibility is not None:
            with self.state.lock:
                repo_obj.private = visibility == 'private'
        self._json(200, {})

    def _entry_json(self, entry: FileEntry) -> dict:
        item = {'type': 'file', 'oid': entry.git_oid, 'size': entry.size, 'path': entry.path}
        if entry.lfs_sha256:
            item['lfs'] = {'oid': entry.lfs_sha256, 'size': entry.size, 'pointerSize': 134}
        return item

    def _tree(self, query, head, repo, rev, sub=None):
        found = self._readable_commit(repo, rev)
        if found is None:
            return
        repo_obj, commit = found
        prefix = f'{sub.strip("/")}/' if sub else ''
        items = [self._entry_json(e) for p, e in sorted(commit.files.items()) if p.startswith(prefix)]
        self._json(200, items)

    def _paths_info(self, query, head, repo, rev):
        body = self._body()
        ctype = self.headers.get('Content-Type', '')
        if 'json' in ctype:
            paths = json.loads(body).get('paths', [])
        else:
            paths = parse_qs(body.decode()).get('paths', [])
        found = self._readable_commit(repo, rev)
        if found is None:
            return
        repo_obj, commit = found
        self._json(200, [self._entry_json(commit.files[p]) for p in paths if p in commit.files])

    def _commits(self, query, head, repo, rev):
        found = self._readable_commit(repo, rev)
        if found is None:
            return
        repo_obj, commit = found
        history = []
        while commit is not None:
            history.append({'id': commit.oid, 'title': commit.title, 'message': '', 'authors': [],
                            'date': time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(commit.date))})
            commit = repo_obj.commits.get(commit.parent) if commit.parent else None
        self._json(200, history)

    def _writable_repo(self, repo_id: str) -> Optional[Repo]:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self.state.can_write(user, repo_id)):
            self._error(401 if user is None else 404, f'Repository Not Found: {repo_id}', 'RepoNotFound')
            return None
        if not self.state.can_write(user, repo_id):
            self._error(401 if user is None else 403, f'You don\'t have the rights to write to {repo_id}')
            return None
        return repo

    def _preupload(self, query, head, repo, rev):
        payload = json.loads(self._body())
        repo_obj = self._writable_repo(repo)
        if repo_obj is None:
            return
        commit = repo_obj.resolve(rev)
        files = []
        for f in payload['files']:
            sample = base64.b64decode(f['sample'])
            lfs = f['size'] > 10 * 2 ** 20 or b'\0' in sample or f['path'].endswith('.safetensors')
            existing = commit.files.get(f['path']) if commit else None
            files.append({'path': f['path'], 'uploadMode': 'lfs' if lfs else 'regular', 'shouldIgnore': False,
                          'oid': existing.git_oid if existing else None})
        self._json(200, {'files': files, 'commitOid': commit.oid if commit else None})

    def _lfs_batch(self, query, head, repo):
        payload = json.loads(self._body())
        if self._writable_repo(repo) is None:
            return
        objects = []
        for obj in payload['objects']:
            item = {'oid': obj['oid'], 'size': obj['size'], 'authenticated': True}
            if obj['oid'] not in self.state.blobs:
                href = f'{self._base()}/_lfs/{obj["oid"]}'
                item['actions'] = {'upload': {'href': href, 'header': {}},
                                   'verify': {'href': f'{href}/verify', 'header': {}}}
            objects.append(item)
        self._json(200, {'transfer': 'basic', 'objects': objects, 'hash_algo': 'sha256'})

    def _lfs_put(self, query, head, oid):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, 'uploaded content does not match its sha256')
        with self.state.lock:
            self.state.blobs[oid] = data
        self._send(200)

    def _lfs_verify(self, query, head, oid):
        payload = json.loads(self._body() or b'{}')
        blob = self.state.blobs.get(oid)
        if blob is None or payload.get('size', len(blob)) != len(blob):
            return self._error(404, 'object not uploaded')
        self._json(200, {})

    def _commit(self, query, head, repo, rev):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo_obj = self._writable_repo(repo)
        if repo_obj is None:
            return
        branch = unquote(rev)
        if branch not in repo_obj.branches:
            return self._error(404, f'Invalid rev id: {branch}', 'RevisionNotFound')
        with self.state.lock:
            parent = repo_obj.commits[repo_obj.branches[branch]]
            files = dict(parent.files)
            title = 'commit'
            for line in lines:
                key, value = line['key'], line['value']
                if key == 'header':
                    title = value.get('summary') or title
                elif key == 'file':
                    data = base64.b64decode(value['content'])
                    oid = _git_blob_oid(data)
                    self.state.blobs[oid] = data
                    files[value['path']] = FileEntry(value['path'], len(data), oid, None, oid)
                elif key == 'lfsFile':
                    blob = self.state.blobs.get(value['oid'])
                    if blob is None:
                        return self._error(422, f'LFS object {value["oid"]} of {value["path"]} was never uploaded')
                    pointer = (f'version https://git-lfs.github.com/spec/v1\noid sha256:{value["oid"]}\n'
                               f'size {len(blob)}\n').encode()
                    files[value['path']] = FileEntry(value['path'], len(blob), value['oid'], value['oid'],
                                                     _git_blob_oid(pointer))
                elif key == 'deletedFile':
                    files.pop(value['path'], None)
                else:
                    return self._error(400, f'unsupported commit operation {key}')
            commit = Commit(oid=_new_commit_oid(parent.oid, title), parent=parent.oid, title=title, files=files,
                            author=self._user())
            repo_obj.commits[commit.oid] = commit
            repo_obj.branches[branch] = commit.oid
        self._json(200, {'commitUrl': f'{self._base()}/{repo}/commit/{commit.oid}', 'commitOid': commit.oid,
                         'pullRequestUrl': None})

    def _resolve(self, query, head, repo, rev, file):
        repo_obj = self._readable_repo(repo, head=head)
        if repo_obj is None:
            return
        commit = repo_obj.resolve(rev)
        if commit is None:
            return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound', head=head)
        entry = commit.files.get(file)
        if entry is None:
            return self._error(404, f'{file} does not exist at {rev}', 'EntryNotFound', head=head)
        data = self.state.blobs[entry.blob_key]
        if (repo, file) in self.state.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {'X-Repo-Commit': commit.oid, 'ETag': f'"{entry.etag}"', 'Accept-Ranges': 'bytes'}
        if entry.lfs_sha256:
            headers.update({'X-Linked-Etag': f'"{entry.lfs_sha256}"', 'X-Linked-Size': str(entry.size)})
        start = 0
        m = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range', ''))
        if m and not head:
            start = int(m.group(1))
            headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
        body = data[start:]
        if (repo, file) in self.state.truncated and not head:  # announce the whole file, send half, hang up
            body, self.close_connection = body[:len(body) // 2], True
        self._send(206 if start else 200, body, headers=headers, content_type='application/octet-stream',
                   head=head, length=len(data) - start)


@contextmanager
def serve_hub(tokens: Dict[str, str], orgs: Dict[str, Set[str]]) -> Iterator[Tuple[str, HubState]]:
    """Run a test Hub on 127.0.0.1 (free port) for the ``with`` block; yields (endpoint URL, state)."""
    state = HubState(tokens=dict(tokens), orgs={k: set(v) for k, v in orgs.items()})
    handler = type('HubHandler', (_HubHandler,), {'state': state})
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name='test-hub', daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}', state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
