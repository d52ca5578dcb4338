"""ifw.local: ifw on one machine, without a cluster (the local stack, `ifw local`).

- ``control_plane``: a real kube-apiserver + etcd on loopback (the project's own build, or
  envtest's binaries, or an existing cluster);
- ``standin``: not a kubelet: a stand-in for the kubelet and the Job controller that runs each
  runner Job's container command as a local process;
- ``stack``: the whole system (control plane, operator, gateway, stand-in) as processes;
- ``cli``: the ``ifw`` command.

The tests use the same pieces, so what `make demo` shows is what CI checks.
"""
