"""The `ifw` command: the local stack and its parts, and reading results.

    ifw local [--serve] [--audio FILE] [--model M] [--timestamp chunk|word] [--diarize]
              [--allow-media-host HOST_OR_CIDR]... [--allow-webhook-host HOST_OR_CIDR]...
    ifw control-plane up [--kubeconfig-out PATH] | build
    ifw standin [--kubeconfig PATH]
    ifw result NAME [-n NAMESPACE] [--format json|text|srt|vtt|verbose_json]

Installed as `kubectl-ifw` too, so `kubectl ifw result NAME` works as a kubectl plugin.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "local": ("ifw.local.stack", "the whole stack on this machine: transcribe a sample, or --serve"),
    "control-plane": ("ifw.local.control_plane", "a real kube-apiserver + etcd on loopback"),
    "standin": ("ifw.local.standin", "run runner Jobs as local processes (a kubelet stand-in)"),
    "result": ("ifw.local.result", "print a finished job's transcript (json, text, srt, vtt, verbose_json)"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:14s} {summary}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[args[0]][0])
    return module.main(args[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
