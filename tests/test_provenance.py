"""Tests of rundir.provenance and rundir.store_provenance: what produced a
run, recorded without importing TensorFlow."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

from dreamer_tf import rundir

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

DEVICES = 'Devices: CPU; dtype policy float32.'


def git(root, *args):
  return subprocess.run(
      ['git', '-c', 'user.name=t', '-c', 'user.email=t@example.com', *args],
      cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_commit_of_this_checkout():
  before = git(rundir.REPO_ROOT, 'rev-parse', 'HEAD')
  info = rundir.provenance(DEVICES)
  after = git(rundir.REPO_ROOT, 'rev-parse', 'HEAD')
  assert info['commit'] in (before, after)  # others may commit meanwhile
  assert isinstance(info['dirty'], bool)
  assert info['devices'] == DEVICES
  assert info['python'] == '.'.join(map(str, sys.version_info[:3]))
  assert isinstance(info['host'], str) and info['host']
  json.dumps(info)  # JSON-ready


def test_versions_are_the_installed_ones():
  versions = rundir.provenance(DEVICES)['versions']
  names = {'tensorflow': 'tensorflow',
           'tensorflow_probability': 'tensorflow-probability',
           'keras': 'keras', 'tf_keras': 'tf-keras',
           'dm_control': 'dm-control', 'mujoco': 'mujoco', 'numpy': 'numpy'}
  assert set(versions) == set(names)
  for key, name in names.items():
    assert versions[key] == importlib.metadata.version(name), key


def test_missing_package_is_none(monkeypatch):
  monkeypatch.setitem(rundir.PACKAGES, 'tensorflow', ('no-such-dist-xyz',))
  assert rundir.provenance(DEVICES)['versions']['tensorflow'] is None


def test_outside_a_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
  monkeypatch.setattr(rundir, 'REPO_ROOT', tmp_path)
  info = rundir.provenance(DEVICES)
  assert (info['commit'], info['dirty']) == ('unknown', None)
  # A folder inside someone else's checkout is not a checkout of ours.
  git(tmp_path, 'init', '-q')
  git(tmp_path, 'commit', '-q', '--allow-empty', '-m', 'theirs')
  (tmp_path / 'sub').mkdir()
  monkeypatch.setattr(rundir, 'REPO_ROOT', tmp_path / 'sub')
  assert rundir.provenance(DEVICES)['commit'] == 'unknown'


def test_without_git_the_commit_is_unknown(monkeypatch):
  monkeypatch.setenv('PATH', '')
  info = rundir.provenance(DEVICES)
  assert (info['commit'], info['dirty']) == ('unknown', None)


def test_commit_and_dirty_of_a_checkout(tmp_path, monkeypatch):
  git(tmp_path, 'init', '-q')
  (tmp_path / 'code.py').write_text('x = 1\n')
  git(tmp_path, 'add', 'code.py')
  git(tmp_path, 'commit', '-q', '-m', 'first')
  monkeypatch.setattr(rundir, 'REPO_ROOT', tmp_path)
  info = rundir.provenance(DEVICES)
  assert info['commit'] == git(tmp_path, 'rev-parse', 'HEAD')
  assert info['dirty'] is False
  (tmp_path / 'new_untracked.txt').write_text('not code\n')
  assert rundir.provenance(DEVICES)['dirty'] is False
  (tmp_path / 'code.py').write_text('x = 2\n')
  assert rundir.provenance(DEVICES)['dirty'] is True


def test_store_appends_one_line_per_start(tmp_path):
  first = rundir.provenance(DEVICES)
  rundir.store_provenance(tmp_path, first)
  rundir.store_provenance(tmp_path, dict(first, host='other-node'))
  lines = (tmp_path / 'provenance.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert len(records) == 2
  assert [r['host'] for r in records] == [first['host'], 'other-node']
  for r in records:
    assert set(r) == set(first) | {'time'}
    assert r['versions'] == first['versions']


def test_imports_no_tensorflow():
  code = ('import sys; from dreamer_tf import rundir; '
          'rundir.provenance("x"); '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"; '
          'assert "keras" not in sys.modules, "keras imported"')
  subprocess.run([sys.executable, '-c', code], cwd=rundir.REPO_ROOT,
                 check=True, timeout=120)
