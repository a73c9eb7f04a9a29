"""The bpy-free, torch-free core of the Neural Atlas add-on.

Installed into the backend's environment as ``neural_atlas.core`` so that both
sides share one wire protocol. Standard library, pyzmq and msgpack only;
modules import each other relatively (the add-on is loaded as
``bl_ext.<repo>.<id>``). Import the submodules you need: ``protocol`` and
``signing`` need no zmq; ``client`` does.
"""
