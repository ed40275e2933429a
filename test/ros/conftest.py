"""Fixtures of the ROS tests (test/ros: the node in-process, as processes, served, ...)."""
import pytest


@pytest.fixture(scope='session')
def answering_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model trained to give ``answering_model.ANSWER``, once per session."""
    from answering_model import make_answering_checkpoint
    return make_answering_checkpoint(tiny_checkpoint,
                                     tmp_path_factory.mktemp('answering') / 'model')
