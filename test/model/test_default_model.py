"""model/default_model.py's cache: what it writes, every user can read (a node process that
finds a planted or changed cache refuses it: test/ros/test_node_process.py)."""


def test_the_default_model_cache_is_readable_by_every_user(default_model_float32):
    folder = default_model_float32
    assert (folder / 'model.safetensors').is_file()
    assert {oct(path.stat().st_mode & 0o777) for path in folder.iterdir()} == {oct(0o644)}
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert oct(folder.parent.stat().st_mode & 0o777) == oct(0o755)
