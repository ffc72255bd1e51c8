"""Tests for dreamer_tf.replay: episode files, loading and window sampling."""

import collections
import itertools
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamer_tf import replay

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'episodes'
KEYS = ('image', 'action', 'reward', 'discount')


def make_episode(episode_id, length, size=64):
  """Synthetic episode whose values encode (episode_id, t)."""
  t = np.arange(length)
  image = np.zeros((length, size, size, 3), np.uint8)
  image[:] = (t % 256).astype(np.uint8)[:, None, None, None]
  action = np.stack([np.full(length, episode_id), t], -1)
  return {
    'image': image,
    'action': action.astype(np.float32),
    'reward': (episode_id * 1000 + t).astype(np.float32),
    'discount': np.ones(length, np.float32),
  }


def check_window(window):
  """Assert a window is consecutive steps of one synthetic episode."""
  ids, times = np.divmod(window['reward'].astype(np.int64), 1000)
  assert (ids == ids[0]).all(), ids
  np.testing.assert_array_equal(np.diff(times), 1)
  np.testing.assert_array_equal(window['action'][:, 0], ids)
  np.testing.assert_array_equal(window['action'][:, 1], times)
  np.testing.assert_array_equal(window['image'][:, -1, -1, -1], times % 256)
  return int(ids[0]), int(times[0])


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  episode = {
    'image': rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8),
    'action': rng.uniform(-1, 1, (7, 2)).astype(np.float32),
    'reward': rng.normal(size=7).astype(np.float32),
    'discount': np.array([1, 1, 1, 1, 1, 1, 0], np.float32),
    'position': rng.normal(size=(7, 3)),  # float64 is written as float32
  }
  path = replay.save_episode(tmp_path / 'episodes', episode)
  assert re.fullmatch(r'\d{8}T\d{6}-[0-9a-f]{32}-7\.npz', path.name)
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
  loaded = replay.load_episodes(path.parent)
  assert list(loaded) == [path.name]
  assert sorted(loaded[path.name]) == sorted(episode)
  for key, value in loaded[path.name].items():
    expected = episode[key]
    if expected.dtype == np.float64:
      expected = expected.astype(np.float32)
    assert value.dtype == expected.dtype, key
    np.testing.assert_array_equal(value, expected)
  assert replay.load_episodes(path.parent, min_length=8) == {}


def test_failed_write_leaves_no_episode(tmp_path, monkeypatch):
  def broken_savez(file, **arrays):
    file.write(b'PK partial')
    raise OSError('disk full')
  monkeypatch.setattr(replay.np, 'savez_compressed', broken_savez)
  with pytest.raises(OSError, match='disk full'):
    replay.save_episode(tmp_path, make_episode(0, 5, 4))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('change', [
  lambda e: e.pop('discount'),
  lambda e: e.update(reward=e['reward'][:-1]),
  lambda e: e.update(image=e['image'].astype(np.float32)),
  lambda e: e.update(action=e['action'][:, 0]),
  lambda e: e.update(note=np.array(['a'] * 5)),
])
def test_save_rejects_bad_episodes(tmp_path, change):
  episode = make_episode(0, 5)
  change(episode)
  with pytest.raises(ValueError):
    replay.save_episode(tmp_path, episode)
  assert list(tmp_path.iterdir()) == []


def test_reference_episode_files():
  episodes = replay.load_episodes(FIXTURES)
  assert len(episodes) == 2
  for episode in episodes.values():
    assert episode['image'].shape == (101, 64, 64, 3)
    assert episode['image'].dtype == np.uint8
    assert episode['action'].shape == (101, 1)
    for key in ('action', 'reward', 'discount'):
      assert episode[key].dtype == np.float32
      assert len(episode[key]) == 101
  assert replay.count_steps(FIXTURES, action_repeat=2) == 400
  dataset = replay.make_dataset(FIXTURES, 3, 50, seed=0)
  for batch in dataset.take(2):
    assert batch['image'].shape == (3, 50, 64, 64, 3)
    assert batch['action'].shape == (3, 50, 1)
    assert batch['reward'].shape == batch['discount'].shape == (3, 50)
    for row in batch['reward'].numpy():
      assert any(
        np.array_equal(row, e['reward'][s:s + 50])
        for e in episodes.values() for s in range(52))


def test_reads_reference_float16(tmp_path):
  episode = make_episode(3, 6)
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v
          for k, v in episode.items()}
  np.savez_compressed(tmp_path / '20200101T000000-abc-6.npz', **half)
  loaded = replay.load_episodes(tmp_path)['20200101T000000-abc-6.npz']
  for key in ('action', 'reward', 'discount'):
    assert loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], half[key])
  # Without a length in the name, min_length applies after loading.
  (tmp_path / '20200101T000000-abc-6.npz').rename(tmp_path / 'x.npz')
  assert replay.load_episodes(tmp_path, min_length=7) == {}
  assert list(replay.load_episodes(tmp_path, min_length=6)) == ['x.npz']


def test_count_steps_reads_names_only(tmp_path):
  (tmp_path / '20200101T000000-aaaa-11.npz').write_bytes(b'not a zip')
  (tmp_path / '20200101T000000-bbbb-6.npz').write_bytes(b'')
  (tmp_path / '20200101T000000-cccc-50.npz.tmp').write_bytes(b'')
  assert replay.count_steps(tmp_path, action_repeat=3) == (10 + 5) * 3
  assert replay.count_steps(tmp_path / 'missing', action_repeat=2) == 0


def test_truncated_and_temp_files_are_skipped(tmp_path):
  good, other = sorted(FIXTURES.glob('*.npz'))
  shutil.copy(good, tmp_path)
  data = other.read_bytes()
  (tmp_path / other.name).write_bytes(data[:len(data) // 2])
  (tmp_path / (other.name + '.tmp')).write_bytes(data)
  with pytest.warns(UserWarning, match=re.escape(other.name)):
    episodes = replay.load_episodes(tmp_path)
  assert list(episodes) == [good.name]
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # Not retried, so no second warning.
    assert list(replay.load_episodes(tmp_path)) == [good.name]
  assert replay.count_steps(tmp_path, 2) == 400  # The .tmp is not counted.
  batch = next(iter(replay.make_dataset(tmp_path, 2, 10, seed=0)))
  assert batch['image'].shape == (2, 10, 64, 64, 3)


@pytest.mark.parametrize('balance', [False, True])
def test_batches_never_cross_episodes(tmp_path, balance):
  for episode_id, length in enumerate([8, 9, 13, 20, 3]):
    replay.save_episode(tmp_path, make_episode(episode_id, length))
  dataset = replay.make_dataset(tmp_path, 4, 8, balance=balance, seed=1)
  used = set()
  for batch in dataset.take(30):
    batch = {k: v.numpy() for k, v in batch.items()}
    assert batch['image'].shape == (4, 8, 64, 64, 3)
    assert batch['image'].dtype == np.uint8
    assert batch['action'].shape == (4, 8, 2)
    assert batch['reward'].shape == batch['discount'].shape == (4, 8)
    for key in ('action', 'reward', 'discount'):
      assert batch[key].dtype == np.float32
    for b in range(4):
      used.add(check_window({k: v[b] for k, v in batch.items()})[0])
  assert used == {0, 1, 2, 3}  # Episode 4 (3 steps) is too short.


def test_every_window_start_is_sampled():
  cache = {'a': make_episode(0, 12, 4), 'b': make_episode(1, 5, 4),
           'c': make_episode(2, 4, 4)}
  windows = replay.sample_windows(None, 5, seed=0, cache=cache)
  counts = collections.Counter(
    check_window(w) for w in itertools.islice(windows, 4000))
  assert set(counts) == {(0, s) for s in range(8)} | {(1, 0)}
  assert 1800 < counts[(1, 0)] < 2200  # Episodes are chosen uniformly.
  for start in range(8):
    assert 180 < counts[(0, start)] < 320  # ~250 each.


def test_balance_favours_the_end():
  cache = {'a': make_episode(0, 12, 4)}
  windows = replay.sample_windows(None, 5, True, seed=0, cache=cache)
  counts = collections.Counter(
    check_window(w)[1] for w in itertools.islice(windows, 3000))
  assert set(counts) == set(range(8))
  assert 0.37 < counts[7] / 3000 < 0.46  # P(last start) = 5/12.


def test_new_episodes_are_picked_up(tmp_path):
  replay.save_episode(tmp_path, make_episode(0, 10, 4))
  windows = replay.sample_windows(tmp_path, 5, seed=0, reload_every=10)
  assert {check_window(next(windows))[0] for _ in range(20)} == {0}
  replay.save_episode(tmp_path, make_episode(1, 10, 4))
  ids = [check_window(next(windows))[0] for _ in range(200)]
  assert ids.count(1) > 50


def test_no_usable_episode_raises(tmp_path):
  with pytest.raises(RuntimeError, match='No episode'):
    next(replay.sample_windows(tmp_path, 5, timeout=0.2))
  replay.save_episode(tmp_path, make_episode(0, 4, 4))
  with pytest.raises(RuntimeError, match='at least 5 steps'):
    replay.make_dataset(tmp_path, 2, 5, timeout=0.2)


def test_step_arithmetic_rounds_one_way_everywhere():
  # An episode of L entries took L - 1 agent steps (entry 0 is the reset).
  assert replay.episode_steps(101, 2) == 200
  assert replay.episode_steps(1, 4) == 0
  assert replay.env_steps(250, 4) == 1000
  # Agent steps that cover n environment steps: rounded up, as the
  # reference's TimeLimit(time_limit / action_repeat) with a float does.
  assert replay.agent_steps(1000, 2) == 500
  assert replay.agent_steps(1001, 2) == 501
  assert replay.agent_steps(999, 4) == 250
  assert replay.agent_steps(0, 3) == 0
  assert replay.max_length(1000, 2) == 501
  assert replay.max_length(1001, 2) == 502


def test_time_limit_and_batch_length_check_agree(tmp_path):
  # 5 frames at action repeat 2: 3 agent steps, so episodes of 4 entries.
  import functools

  import dreamer
  import wrappers
  ctor = functools.partial(wrappers.make_env, 'dmc_cartpole_balance',
                           action_repeat=2, time_limit=5)
  with wrappers.Envs([ctor], 'none') as envs:
    envs.reset(0)
    steps, done = 0, False
    while not done:
      _, _, done, info = envs.step([np.zeros(1, np.float32)])[0]
      steps += 1
  assert steps == 3 and len(info['episode']['image']) == 4
  assert replay.max_length(5, 2) == 4
  flags = ['--logdir', str(tmp_path), '--task', 'dmc_cartpole_balance',
           '--time_limit', '5', '--action_repeat', '2', '--log_every', '0']
  dreamer.check_config(dreamer.parse_args(flags + ['--batch_length', '4']))
  with pytest.raises(ValueError, match='longer than an episode'):
    dreamer.check_config(dreamer.parse_args(flags + ['--batch_length', '5']))


def test_only_valid_episodes_of_this_run_count(tmp_path):
  good = [replay.save_episode(tmp_path, make_episode(i, 11, size=8))
          for i in range(2)]
  # An empty file that claims 100,000 steps, a truncated one, one of other
  # image and action shapes, one whose length disagrees with its name.
  (tmp_path / '20260101T000000-empty-100001.npz').write_bytes(b'')
  data = good[0].read_bytes()
  (tmp_path / '20260101T000000-cut-11.npz').write_bytes(data[:len(data) // 2])
  replay.save_episode(tmp_path, make_episode(7, 11, size=16))
  other = make_episode(8, 11, size=8)
  other['action'] = np.zeros((11, 3), np.float32)
  replay.save_episode(tmp_path, other)
  shutil.copy(good[1], tmp_path / '20260101T000000-renamed-50.npz')
  said = []
  spec = dict(image=(8, 8, 3), action=(2,))
  assert replay.check_episodes(tmp_path, 2, spec, said.append) == 2 * 10 * 2
  assert sorted(p.name for p in tmp_path.glob('*.npz')) == sorted(
      p.name for p in good)
  assert len(list((tmp_path / 'rejected').glob('*.npz'))) == 5
  assert len(said) == 5 and all('moved' in line and 'rejected' in line
                                for line in said)
  assert any('image shape (16, 16, 3) where this run has (8, 8, 3)' in line
             for line in said)
  assert any('action shape (3,) where this run has (2,)' in line
             for line in said)
  assert any('empty' in line and 'BadZipFile' in line for line in said)
  assert any('do not match the name (50)' in line for line in said)


def test_episodes_of_other_shapes_are_rejected_when_loaded(tmp_path):
  replay.save_episode(tmp_path, make_episode(0, 11, size=8))
  path = replay.save_episode(tmp_path, make_episode(1, 11, size=16))
  with pytest.warns(UserWarning, match='image shape'):
    cache = replay.load_episodes(tmp_path, spec=dict(image=(8, 8, 3)))
  assert len(cache) == 1
  assert (tmp_path / 'rejected' / path.name).exists()


def test_the_replay_bound_keeps_the_newest_episodes_in_memory(tmp_path):
  # Six episodes of 10 agent steps, oldest first by the time in the name.
  def add(index):
    path = replay.save_episode(tmp_path, make_episode(index, 11))
    name = f'20260101T0000{index:02d}-{path.name.split("-", 1)[1]}'
    path.rename(tmp_path / name)
  for index in range(6):
    add(index)
  cache = {}
  windows = replay.sample_windows(tmp_path, 5, seed=0, cache=cache,
                                  capacity=25, reload_every=50)
  seen = set()
  for _ in range(40):
    window = next(windows)
    check_window(window)           # Never crosses an episode.
    seen.add(int(window['action'][0, 0]))
  held = {int(e['action'][0, 0]) for e in cache.values() if e is not None}
  # 60 steps in all; dropping the oldest until at most 25 remain: 4 and 5.
  assert held == seen == {4, 5}
  assert sum(len(e['image']) - 1 for e in cache.values() if e) <= 25 + 10
  assert len(list(tmp_path.glob('*.npz'))) == 6   # All stay on disk.
  # A newer episode arrives: the oldest in memory goes, none comes back.
  add(6)
  for _ in range(60):
    seen.add(int(next(windows)['action'][0, 0]))
  held = {int(e['action'][0, 0]) for e in cache.values() if e is not None}
  assert held == {5, 6} and 6 in seen
  assert replay.count_steps(tmp_path, 2) == 7 * 10 * 2   # Steps still count.


def test_without_a_bound_everything_stays(tmp_path):
  for index in range(4):
    replay.save_episode(tmp_path, make_episode(index, 11))
  cache = {}
  next(replay.sample_windows(tmp_path, 5, cache=cache, capacity=0))
  assert all(e is not None for e in cache.values()) and len(cache) == 4


# The replay bound keeps the newest episodes by arrival (issue 19 item 1).


def write_episode(directory, name, length, mtime_ns, episode_id=0):
  """An episode file of `length` entries (tiny frames) with a chosen name
  and modification time; returns its name."""
  path = pathlib.Path(directory) / name
  with open(path, 'wb') as f:
    np.savez_compressed(f, **make_episode(episode_id, length, size=1))
  os.utime(path, ns=(mtime_ns, mtime_ns))
  return name


def held_names(cache):
  return {name for name, episode in cache.items() if episode is not None}


def reload(directory, cache, capacity, min_length=1):
  """One reload as `sample_windows` does it: load, then evict."""
  replay.load_episodes(directory, cache, min_length, capacity=capacity)
  replay.evict(cache, capacity)
  return held_names(cache)


def expected_held(arrived, capacity):
  """Model of the bound: `arrived` is [(name, length)] oldest first; the
  newest episodes whose L - 1 steps add up to at most `capacity`, and at
  least the newest one."""
  held, total = set(), 0
  for name, length in reversed(arrived):
    if held and total + length - 1 > capacity:
      break
    held.add(name)
    total += length - 1
  return held


episode_draw = st.tuples(
    st.integers(1, 9),        # L, entries (L - 1 steps).
    st.integers(0, 5),        # Seconds in the name: may go backwards.
    st.integers(0, 3),        # Modification time: ties happen.
    st.booleans())            # Whether the name ends with the length.


@settings(max_examples=200, deadline=None, database=None)
@given(capacity=st.integers(1, 20), min_length=st.integers(1, 3),
       reloads=st.lists(st.lists(episode_draw, min_size=1, max_size=4),
                        min_size=1, max_size=5))
def test_bound_holds_the_newest_by_arrival(capacity, min_length, reloads):
  with tempfile.TemporaryDirectory() as directory:
    cache, arrived, unnamed, reads = {}, [], set(), []
    read_episode = replay._read_episode
    def counting_read(path):
      reads.append(pathlib.Path(path).name)
      return read_episode(path)
    with mock.patch.object(replay, '_read_episode', counting_read):
      for batch_index, batch in enumerate(reloads):
        batch_files = []
        for index, (length, second, mtime, named) in enumerate(batch):
          name = f'20260101T0000{second:02d}-b{batch_index}i{index}'
          if named:
            name += f'-{length}'
          else:
            unnamed.add(name + '.npz')
          # Neither names nor modification times follow the arrivals.
          write_episode(directory, name + '.npz', length, mtime * 10**9)
          batch_files.append((mtime, name + '.npz', length))
        # The model: this batch arrives after all earlier ones, ordered
        # among itself by modification time, then name; too short ones
        # never arrive.
        arrived += [(name, length) for _, name, length in sorted(batch_files)
                    if length >= min_length]
        reads.clear()
        held = reload(directory, cache, capacity, min_length)
        assert held == expected_held(arrived, capacity)
        order = [name for name, _ in arrived]
        # Every arrival is in the cache, in order; others are only short
        # files without a length in their name, marked as not to be read.
        assert [name for name in cache if name in order] == order
        assert all(cache[name] is None and name in unnamed
                   for name in cache if name not in order)
        oldest_held = min((order.index(name) for name in held),
                          default=len(order))
        assert all(cache[name] is not None for name in order[oldest_held:])
        # Only what is held now was read, except names without a length.
        assert set(reads) - held <= unnamed, (reads, held)


def test_episodes_arriving_together_all_fit(tmp_path):
  # Room for 4 episodes of 10 steps. Four episodes of several envs end
  # together and arrive in one reload: they replace the 4 older ones.
  old = [write_episode(tmp_path, f'20260101T00000{i}-old{i}-11.npz', 11,
                       i * 10**9, i) for i in range(4)]
  cache = {}
  assert reload(tmp_path, cache, 40) == set(old)
  new = [write_episode(tmp_path, f'20260101T00010{i}-new{i}-11.npz', 11,
                       (10 + i) * 10**9, 10 + i) for i in range(4)]
  assert reload(tmp_path, cache, 40) == set(new)
  assert all(cache[name] is None for name in old)
  # Through the sampler too: one window after the reload of a fifth one.
  newest = write_episode(tmp_path, '20260101T000200-new4-11.npz', 11,
                         20 * 10**9, 14)
  next(replay.sample_windows(tmp_path, 5, seed=0, cache=cache, capacity=40))
  assert held_names(cache) == set(new[1:]) | {newest}


def test_a_name_that_sorts_later_hides_nothing(tmp_path):
  # A file whose name sorts after every other (a clock ahead, a copied
  # file), then episodes from a clock that is behind.
  first = write_episode(tmp_path, '20260101T120000-aaaa-11.npz', 11, 10**9)
  ahead = write_episode(tmp_path, '20991231T235959-bbbb-11.npz', 11,
                        2 * 10**9, 1)
  cache = {}
  assert reload(tmp_path, cache, 20) == {first, ahead}
  later = []
  for i in range(3):
    later.append(write_episode(tmp_path, f'20260101T00000{i}-c{i}-11.npz',
                               11, (10 + i) * 10**9, 2 + i))
    assert later[-1] in reload(tmp_path, cache, 20)
  assert held_names(cache) == set(later[-2:])
  assert cache[ahead] is None and cache[first] is None


def test_evict_drops_by_arrival_not_by_name():
  cache = {'b': make_episode(0, 11, 1), 'a': make_episode(1, 11, 1)}
  replay.evict(cache, 10)
  assert cache['b'] is None and cache['a'] is not None


def test_a_large_old_folder_is_read_only_up_to_the_bound(tmp_path,
                                                         monkeypatch):
  # A resumed run finds 40 old episodes (10 steps each); room for 3.
  names = [write_episode(tmp_path, f'20260101T0000{i:02d}-e{i:02d}-11.npz',
                         11, i * 10**9, i) for i in range(40)]
  reads = []
  read_episode = replay._read_episode
  def counting_read(path):
    reads.append(path.name)
    return read_episode(path)
  monkeypatch.setattr(replay, '_read_episode', counting_read)
  cache = replay.load_episodes(tmp_path, capacity=30)
  assert held_names(cache) == set(names[-3:])
  assert reads == names[:-4:-1]     # Only the 3 newest were read.
  assert list(cache) == names       # The rest marked None, in order.
