"""The Python runc shim, `containerd-shim-pyrunc-v2` (runtime name `io.containerd.pyrunc.v2`).

A containerd v2 shim as containerd's own `containerd-shim-runc-v2` is: the `start` action creates
the shim's socket and leaves a server process running, the `delete` action cleans up after a dead
shim, and the server serves containerd.task.v2.Task over ttrpc by driving the runc CLI.

Modules, light to heavy:
  launch     flags, the `start` and `delete` actions, the zygote client (standard library only:
             it runs in a fresh interpreter for every container, so its imports are its latency)
  zygote     the pre-imported template process that forks the shim servers (one per group
             of containers: see launch)
  server     one shim server: subreaper, signals, log fifo, ttrpc, lingering, shutdown
  service    the Task service (containers, processes, events, exits)
  process    init and exec processes and their state machines
  runc       the runc command line
  stdio      fifos, files, logging binaries, console sockets and pty copying
  reaper     SIGCHLD: reaping every child and matching exits to waiters and processes
  publisher  events forwarded to the daemon's ttrpc Events service, queued and retried
  cgroups    cgroup v1/v2 discovery, stats as containerd's metrics protobufs, OOM watching
  proto      the few protobuf messages encoded by hand (DeleteResponse, cgroups metrics)

This package registers no daemon plugin and must stay cheap to import: the daemon's runtime
manager may import its parent packages, and cmd/shim.py loads this package by path (under an
alias) so that a shim never imports the daemon's plugin machinery.
"""
