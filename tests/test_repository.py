"""The repository is self-contained: a clone in any folder of any machine
passes, so no tracked file may name a folder of one particular machine."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Home and workspace folders at the top of a file system (home and Users
# with a user name, root, work, workspace, mnt, data, scratch) and Windows
# user folders. Written in pieces so that this file does not match itself.
MACHINE_PATH = re.compile(
    r'(?<![\w.~-])(?:/' + '(?:home|Users)/[^/\\s]+/' + '|/' +
    '(?:root|work|workspace|mnt|data|scratch)/' + r'|[A-Za-z]:\\' +
    r'(?:Users|Documents and Settings)\\)')


def tracked_files():
  try:
    names = subprocess.run(
        ['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True,
        text=True).stdout.split('\0')
    return [ROOT / name for name in names if name]
  except (OSError, subprocess.CalledProcessError):  # Not a git checkout.
    return [path for path in ROOT.rglob('*')
            if path.is_file() and '.git' not in path.parts]


def test_the_pattern_finds_machine_paths():
  for text in ('/' + 'home/alice/dreamer', 'open("/' + 'work/shared/x")',
               '/' + 'root/.cache', 'C:' + '\\Users\\bob\\x'):
    assert MACHINE_PATH.search(text), text
  for text in ('./logdir/dmc_walker_walk', 'tests/fixtures/episodes',
               'https://github.com/danijar/dreamer', '~/.cache/x',
               '/' + 'tmp/run', 'a/work/b'):
    assert not MACHINE_PATH.search(text), text


def test_no_tracked_file_names_a_machine_path():
  found = []
  for path in tracked_files():
    try:
      text = path.read_text()
    except (UnicodeDecodeError, OSError):
      continue  # Binary files (fixtures, images).
    for number, line in enumerate(text.splitlines(), 1):
      if MACHINE_PATH.search(line):
        found.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
  assert not found, 'machine-specific paths:\n' + '\n'.join(found)


def test_tests_read_fixtures_from_the_repository():
  fixtures = ROOT / 'tests' / 'fixtures'
  assert sorted(p.name for p in (fixtures / 'episodes').glob('*.npz'))
  assert (fixtures / 'golden_tiny.npz').is_file()
