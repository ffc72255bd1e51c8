"""Replay storage: the one place that knows the episode file format.

An episode is a dict of NumPy arrays that share their leading length L, where
L counts the reset step (docs/design.md section 5):

  image     uint8   [L, H, W, C]   (64x64x3 for the agent)
  action    float32 [L, A]         action[0] = 0 (reset)
  reward    float32 [L]            reward[0] = 0
  discount  float32 [L]
  ...       any other numeric keys (e.g. DMC state vectors)

Each episode is one `np.savez_compressed` file named
`{%Y%m%dT%H%M%S}-{uuid4 hex}-{L}.npz`, as in the reference, so the number of
stored environment steps can be read from the names alone. The reader also
reads the reference's files (which may hold float16 action/reward/discount).

Step arithmetic lives here too, in one place: an episode of L entries took
`episode_steps(L, repeat) = (L - 1) * repeat` environment steps, and
`agent_steps(n, repeat) = ceil(n / repeat)` agent steps cover n environment
steps (an episode of `time_limit` frames has `agent_steps(time_limit,
repeat)` agent steps, as the reference's float-valued time limit gives).

With a replay bound (`capacity` agent steps), "newest" means newest by
ARRIVAL: the order in which a reader first finds the files, reload after
reload, kept as the insertion order of its cache dict. The names' times
are not trusted for it (a clock behind after a resume on another node, a
time-zone change or a copied file would let one name hide the episodes
that come after it). Files found by the same reload arrive together and
are ordered among themselves by modification time, then by name. The
episodes held are the newest by arrival that fit in the bound (at least
the newest one), and no file that arrived after a held episode is left
unread (see `load_episodes` and `evict`).

This module imports TensorFlow only inside `make_dataset`, so that the
environment workers and flag checking can use it without TensorFlow.

Fixed against the reference (docs/design.md section 8): every training
window that fits in an episode is equally likely, the one ending on the last
step
included, and episodes exactly `length` long are used.
"""

import datetime
import itertools
import os
import pathlib
import re
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np

REQUIRED_KEYS = ('image', 'action', 'reward', 'discount')
_NDIMS = {'image': 4, 'action': 2, 'reward': 1, 'discount': 1}
_LENGTH_RE = re.compile(r'-(\d+)\.npz$')
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError,
                zipfile.BadZipFile, zlib.error)

# Files that failed to load, keyed by (path, size, mtime): they are not
# retried on every call, but are retried if the file changes.
_UNREADABLE = set()


def episode_steps(length, action_repeat):
  """Environment steps taken in an episode of `length` entries: the first
  entry is the reset observation, every other one `action_repeat` frames."""
  return max(int(length) - 1, 0) * action_repeat


def agent_steps(env_steps, action_repeat):
  """Agent steps that cover `env_steps` environment steps, rounded up."""
  return -(-int(env_steps) // action_repeat)


def env_steps(agent_steps, action_repeat):
  """Environment steps (frames) taken by `agent_steps` agent steps."""
  return int(agent_steps) * action_repeat


def max_length(time_limit, action_repeat):
  """Entries of the longest episode under `time_limit` frames (the reset
  entry included): the most agent steps a training window can span."""
  return agent_steps(time_limit, action_repeat) + 1


def episode_spec(envs):
  """{key: trailing shape} that every stored episode of these environments
  (a `wrappers.Envs`) has: the `spec` of the readers below."""
  return dict(image=tuple(envs.observation_space['image'].shape),
              action=tuple(envs.action_space.shape))


def _length_from_name(path):
  """Episode length encoded in a file name, or None if it has none."""
  match = _LENGTH_RE.search(pathlib.Path(path).name)
  return int(match.group(1)) if match else None


def _check_episode(episode):
  """Return the episode as uint8/int/float32 arrays; ValueError if bad."""
  missing = [k for k in REQUIRED_KEYS if k not in episode]
  if missing:
    raise ValueError(
      f'Episode is missing keys {missing}; it has {sorted(episode)}.')
  arrays = {}
  for key, value in episode.items():
    value = np.asarray(value)
    if value.dtype.kind == 'f':
      value = value.astype(np.float32)
    elif value.dtype.kind not in 'biu':
      raise ValueError(
        f'Episode key {key!r} has non-numeric dtype {value.dtype}.')
    if key in _NDIMS and value.ndim != _NDIMS[key]:
      raise ValueError(
        f'Episode key {key!r} must have {_NDIMS[key]} dims, '
        f'got shape {value.shape}.')
    arrays[key] = value
  if arrays['image'].dtype != np.uint8:
    raise ValueError(
      f"Episode 'image' must be uint8, got {arrays['image'].dtype}.")
  lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
  if len(set(lengths.values())) != 1 or lengths['image'] < 1:
    raise ValueError(
      f'Episode arrays must share one leading length >= 1, '
      f'got {lengths}.')
  return arrays


def save_episode(directory, episode):
  """Write one episode to `directory` and return the path of its file.

  Validates the episode (required keys, dims, uint8 image, numeric dtypes,
  one shared length; ValueError otherwise) and stores float arrays as
  float32. The data goes to `<final name>.tmp` first and is then renamed
  with `os.replace`, so a crash mid-write never leaves a `.npz` that a
  later run would read as an episode. Creates `directory` if needed.
  """
  arrays = _check_episode(episode)
  directory = pathlib.Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
  length = len(arrays['image'])
  path = directory / f'{stamp}-{uuid.uuid4().hex}-{length}.npz'
  tmp = path.with_name(path.name + '.tmp')
  try:
    # A file object, because np.savez_compressed appends '.npz' to names.
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def _read_episode(path):
  """Load and validate one episode file; raises one of _READ_ERRORS."""
  # Our own handle, so that it is closed even when np.load fails.
  with open(path, 'rb') as f, np.load(f, allow_pickle=False) as data:
    episode = {key: data[key] for key in data.files}
  return _check_episode(episode)


def _arrivals(directory, cache, min_length):
  """The files of `directory` that arrive now: `*.npz` files not yet in
  `cache`, not too short by their name, and not known to be unreadable in
  their present state. A list of (path, marker), oldest first: by
  modification time, then by name (the tie-break among files that arrive
  together, see `load_episodes`)."""
  found = []
  for path in directory.glob('*.npz'):
    named_length = _length_from_name(path)
    if path.name in cache or (
        named_length is not None and named_length < min_length):
      continue
    try:
      stat = path.stat()
    except OSError:
      continue  # Deleted since the glob.
    marker = (str(path), stat.st_size, stat.st_mtime_ns)
    if marker not in _UNREADABLE:
      found.append((stat.st_mtime_ns, path.name, path, marker))
  found.sort(key=lambda item: item[:2])
  return [(path, marker) for _, _, path, marker in found]


def _load_new(path, marker, min_length, spec):
  """The episode in `path`, or None if it is unreadable (warned about once
  per marker), of another `spec` (moved to `rejected/`) or shorter than
  `min_length`."""
  try:
    episode = _read_episode(path)
  except _READ_ERRORS as error:
    _UNREADABLE.add(marker)
    warnings.warn(f'Skipping unreadable episode file {path}: '
                  f'{type(error).__name__}: {error}', stacklevel=3)
    return None
  arrays = {k: (v.dtype, v.shape) for k, v in episode.items()}
  reason = _mismatch(arrays, spec)
  if reason:
    reject(path, reason, stacklevel=4)
    return None
  return episode if len(episode['image']) >= min_length else None


def load_episodes(directory, cache=None, min_length=0, spec=None,
                  capacity=None):
  """Load the episode files in `directory` that are not yet in `cache`.

  `cache` maps file names (not full paths) to episodes, in the order the
  episodes arrived (oldest first; see the module docstring): it is updated
  in place and returned (a new dict if None). Episodes shorter than
  `min_length` are skipped; when the length is in the file name they are
  skipped without reading the file. Unreadable or truncated files are
  skipped with a warning naming the file and are not retried until they
  change. Temporary `.tmp` files are never read. Float arrays are returned
  as float32. A missing directory adds nothing. With `spec` ({key:
  trailing shape}), episodes of other shapes are moved to `rejected/` with
  a warning when they are loaded.

  The files found by one call arrive together, after everything already in
  `cache`; among themselves they are ordered by modification time, then by
  name (the time at the start of the name, then the random part), which
  is the order they were written in when clocks agree.

  With `capacity` (agent steps), the cache afterwards holds what `evict`
  keeps: the newest episodes by arrival whose steps fit in `capacity`, at
  least the newest one. The new files are read newest first, and older
  held episodes are dropped (set to None) as soon as newer ones take their
  room. The first new episode that does not fit (judged by the length in
  its name, or once read if the name has none) and every older new file
  are marked None without being kept or read (the files stay on disk). So
  memory never holds more than the bound plus the episode being read, even
  when a resumed run finds a large folder of old episodes; and nothing
  newer than a held episode is ever marked None.
  """
  cache = {} if cache is None else cache
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    return cache
  arrivals = _arrivals(directory, cache, min_length)
  if not capacity:
    for path, marker in arrivals:
      episode = _load_new(path, marker, min_length, spec)
      if episode is not None:
        cache[path.name] = episode
    return cache
  # Held episodes from earlier calls, oldest first, with their steps.
  older = [(name, len(episode['image']) - 1)
           for name, episode in cache.items() if episode is not None]
  older_steps, dropped = sum(steps for _, steps in older), 0
  new = {}  # Name -> episode or None, newest first.
  new_steps, held, full = 0, False, False
  for path, marker in reversed(arrivals):
    named_length = _length_from_name(path)
    full = full or held and named_length is not None and (
        new_steps + max(named_length - 1, 0) > capacity)
    if full:
      new[path.name] = None  # It or a newer one does not fit: not read.
      continue
    episode = _load_new(path, marker, min_length, spec)
    if episode is None:
      continue
    steps = len(episode['image']) - 1
    if held and new_steps + steps > capacity:  # A name without a length.
      new[path.name], full = None, True
      continue
    new[path.name] = episode
    held, new_steps = True, new_steps + steps
    while dropped < len(older) and new_steps + older_steps > capacity:
      name, steps = older[dropped]  # The oldest held goes first.
      cache[name] = None
      older_steps -= steps
      dropped += 1
  for name, _ in older[dropped:] if full else ():
    cache[name] = None  # Older than a new file that did not fit.
  for name in reversed(new):
    cache[name] = new[name]
  return cache


def inspect_episode(path):
  """{key: (dtype, shape)} of an episode file, read from the array headers
  without decompressing the data (a few hundred bytes per key); raises
  ValueError (or one of _READ_ERRORS) unless it is a valid episode whose
  length matches its name."""
  arrays = {}
  with zipfile.ZipFile(path) as archive:
    for member in archive.namelist():
      if not member.endswith('.npy'):
        raise ValueError(f'{member} is not a NumPy array')
      with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
          shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # Rare: read the array itself.
          f.seek(0)
          array = np.lib.format.read_array(f, allow_pickle=False)
          shape, dtype = array.shape, array.dtype
      arrays[member[:-len('.npy')]] = (np.dtype(dtype), tuple(shape))
  missing = [k for k in REQUIRED_KEYS if k not in arrays]
  if missing:
    raise ValueError(f'missing keys {missing}')
  for key, ndim in _NDIMS.items():
    if len(arrays[key][1]) != ndim:
      raise ValueError(f'{key!r} has shape {arrays[key][1]}, not {ndim} dims')
  if arrays['image'][0] != np.uint8:
    raise ValueError(f"'image' is {arrays['image'][0]}, not uint8")
  lengths = {shape[0] for _, shape in arrays.values() if shape}
  named = _length_from_name(path)
  if len(lengths) != 1 or (named is not None and lengths != {named}):
    raise ValueError(f'lengths {sorted(lengths)} do not match the name '
                     f'({named})')
  return arrays


def _mismatch(arrays, spec):
  """Why an episode's trailing shapes differ from `spec` ({key: shape}),
  or None."""
  for key, shape in (spec or {}).items():
    have = tuple(arrays[key][1][1:]) if key in arrays else None
    if have != tuple(shape):
      return f'{key} shape {have} where this run has {tuple(shape)}'
  return None


def reject(path, reason, say=None, stacklevel=3):
  """Moves `path` to `<its folder>/rejected/` and says why, in one line
  (with `say`, or as a warning `stacklevel` frames up)."""
  path = pathlib.Path(path)
  folder = path.parent / 'rejected'
  folder.mkdir(exist_ok=True)
  os.replace(path, folder / path.name)
  text = (f'Warning: moved {path.name} to {folder}: not an episode of this '
          f'run ({reason}).')
  if say:
    say(text)
  else:
    warnings.warn(text, stacklevel=stacklevel)


def check_episodes(directory, action_repeat, spec=None, say=None):
  """Environment steps of the valid episode files in `directory`: their
  headers are read (not their data); files that are not episodes, whose
  length disagrees with their name, or whose trailing shapes differ from
  `spec` ({key: shape}, e.g. image (64, 64, 3), action (6,)) are moved to
  `rejected/` with one warning each, and do not count."""
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    return 0
  total = 0
  for path in sorted(directory.glob('*.npz')):
    try:
      arrays = inspect_episode(path)
      reason = _mismatch(arrays, spec)
    except (*_READ_ERRORS, TypeError) as error:
      reason = f'{type(error).__name__}: {error}'
    if reason:
      reject(path, reason, say)
      continue
    total += episode_steps(arrays['image'][1][0], action_repeat)
  return total


def count_steps(directory, action_repeat):
  """Environment steps stored in `directory`, from the file names alone.

  Sums (L - 1) * action_repeat over the `*.npz` files, since L counts the
  reset step. Names without a length are skipped with a warning. A missing
  directory holds 0 steps.
  """
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    return 0
  total = 0
  for path in directory.glob('*.npz'):
    length = _length_from_name(path)
    if length is None:
      warnings.warn(f'Episode file name has no length: {path}', stacklevel=2)
      continue
    total += episode_steps(length, action_repeat)
  return total


def evict(cache, capacity):
  """Drops the oldest episodes of `cache` by arrival (its insertion order,
  see `load_episodes`; not the file names, whose clock may be wrong) until
  it holds at most `capacity` agent steps, always keeping the newest one.
  What stays is the newest episodes that fit. A dropped name stays in the
  cache as None, so that it is not loaded again; its file stays on disk.
  None or 0: keep everything."""
  if not capacity:
    return
  held = [(name, len(episode['image']) - 1)
          for name, episode in cache.items() if episode is not None]
  total = sum(steps for _, steps in held)
  for name, steps in held[:-1]:
    if total <= capacity:
      break
    cache[name] = None
    total -= steps


def _usable(directory, cache, length, timeout, poll=0.5, spec=None,
            capacity=None):
  """Sorted names of cached episodes >= `length` steps, after a reload and
  the eviction of the oldest (by arrival) beyond `capacity` agent steps.

  Polls `directory` until there is one, for up to `timeout` seconds, then
  raises RuntimeError.
  """
  deadline = time.monotonic() + timeout
  while True:
    if directory is not None:
      load_episodes(directory, cache, min_length=length, spec=spec,
                    capacity=capacity)
    evict(cache, capacity)
    names = sorted(k for k, v in list(cache.items())
                   if v is not None and len(v['image']) >= length)
    if names:
      return names
    if directory is None or time.monotonic() >= deadline:
      where = directory if directory is not None else 'the cache'
      raise RuntimeError(
        f'No episode with at least {length} steps in {where} after '
        f'waiting {timeout:g} s. The prefill writes the first '
        f'episodes; check the directory and that batch_length is '
        f'not longer than the episodes.')
    time.sleep(poll)


def sample_windows(directory, length, balance=False, seed=None, *,
                   cache=None, keys=None, reload_every=100, timeout=30.0,
                   spec=None, capacity=None):
  """Infinite generator of windows of `length` consecutive steps.

  Each window is a dict (all the episode's keys, or only `keys`) of new
  arrays cut from one episode. The episode is chosen uniformly among those
  with L >= length, then the start uniformly in [0, L - length] inclusive.
  With `balance`, the start is `min(randint(0, L), L - length)`, which
  favours the end of the episode as in the reference.

  `directory` is re-read through `cache` (so only new files are loaded)
  every `reload_every` windows; this picks up episodes written after the
  generator started. Episodes whose trailing shapes differ from `spec`
  ({key: shape}) are moved to `rejected/` when loaded. With `capacity`,
  only the newest episodes by arrival (the order the reloads first found
  their files, see `load_episodes`) holding at most that many agent steps
  (plus one episode) stay in memory (see `evict`). If no episode is long
  enough, it polls the directory for up to `timeout` seconds and then
  raises RuntimeError. With
  `directory=None` it samples only from the episodes already in `cache`.
  """
  if length < 1:
    raise ValueError(f'Window length must be >= 1, got {length}.')
  rng = np.random.default_rng(seed)
  cache = {} if cache is None else cache
  names = []
  for count in itertools.count():
    if not names or (directory is not None and count % reload_every == 0):
      names = _usable(directory, cache, length, timeout, spec=spec,
                      capacity=capacity)
    episode = cache[names[int(rng.integers(0, len(names)))]]
    total = len(episode['image'])
    if balance:
      start = min(int(rng.integers(0, total)), total - length)
    else:
      start = int(rng.integers(0, total - length + 1))
    yield {k: np.array(episode[k][start:start + length])
           for k in (episode if keys is None else keys)}


def make_dataset(directory, batch_size, batch_length, balance=False,
                 seed=None, keys=REQUIRED_KEYS, *, reload_every=100,
                 timeout=30.0, prefetch=10, spec=None, capacity=None):
  """A `tf.data.Dataset` of dict batches `[batch_size, batch_length, ...]`.

  Windows come from `sample_windows` (see there for sampling, reloading and
  waiting). The output signature is explicit; dtypes and trailing shapes
  are those of the first usable episode: image uint8 [T, H, W, C], action
  float32 [T, A], reward and discount float32 [T]. `prefetch` batches are
  prepared ahead, as in the reference.
  """
  import tensorflow as tf
  cache = {}
  first = cache[_usable(directory, cache, batch_length, timeout,
                       spec=spec, capacity=capacity)[0]]
  missing = [k for k in keys if k not in first]
  if missing:
    raise ValueError(f'Episodes have no keys {missing}; '
                     f'they have {sorted(first)}.')
  signature = {
    k: tf.TensorSpec((batch_length,) + first[k].shape[1:],
                     tf.as_dtype(first[k].dtype))
    for k in keys}

  def windows():
    return sample_windows(
      directory, batch_length, balance, seed, cache=cache, keys=keys,
      reload_every=reload_every, timeout=timeout, spec=spec,
      capacity=capacity)

  dataset = tf.data.Dataset.from_generator(
    windows, output_signature=signature)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.prefetch(prefetch)
