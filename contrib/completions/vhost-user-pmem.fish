complete -c vhost-user-pmem -l socket-path -d 'Path of the vhost-user UNIX socket to listen on. A stale socket file left by a dead daemon is removed; a socket on which a live daemon listens is an error. The daemon serves one frontend after another on it' -r -F
complete -c vhost-user-pmem -l connect -d 'Connect to a frontend that listens on PATH (QEMU\'s -chardev socket,server=on) instead of listening. PATH must be a socket when the daemon starts, and the first connection must succeed, or the daemon exits with an error. When a connection ends the daemon connects again, retrying with a growing delay (0.1 s up to 5 s, each attempt logged) until it succeeds or is stopped by a signal. Excludes --socket-path, --fd, --socket-mode and --socket-group' -r -F
complete -c vhost-user-pmem -l fd -d 'Serve on an already listening UNIX stream socket that was passed to the daemon as file descriptor FD (the vhost-user backend convention; the parent keeps the socket file). The daemon serves one frontend after another on it, like on --socket-path, and removes no file at exit. FD must be open, an AF_UNIX SOCK_STREAM socket, and listening. Excludes --socket-path, --connect, --socket-mode and --socket-group' -r
complete -c vhost-user-pmem -l socket-mode -d 'Permissions of the --socket-path socket file, in octal [default: 0600]. Anyone who can connect to the socket can drive the device, so only the frontend\'s user should be able to. The socket is created with these permissions (no window with wider ones). Does not apply to --connect or --fd, whose socket belongs to the frontend or the parent' -r
complete -c vhost-user-pmem -l socket-group -d 'Give the --socket-path socket file to group NAME (chown before the socket listens, so it is never reachable with another group), to let a frontend of that group connect. With it you usually want --socket-mode 0660: the default 0600 lets only the owner in. Only with --socket-path. The group must exist' -r
complete -c vhost-user-pmem -l seccomp -d 'The seccomp sandbox: `on` (default) installs a system-call allow-list once the file is open and the socket is ready, and a call outside it makes the daemon log the call\'s number and die of SIGSYS; `log` lets such calls through but has the kernel log them (audit log or dmesg, "type=1326"), to find what a new environment needs; `off` installs no filter' -r -f -a "on\t'Install the allow-list; a call outside it kills the daemon (SIGSYS) after a log line'
off\t'Install no filter'
log\t'Let every call through, but have the kernel log those outside the list'"
complete -c vhost-user-pmem -l file -d 'The backing file whose contents the guest sees as persistent memory (required unless --print-capabilities)' -r -F
complete -c vhost-user-pmem -l size -d 'Device size, with binary units (512M, 1G = 1 GiB, 2GiB). A missing file is created sparse, a smaller one is extended; a larger one is an error, since shrinking would lose data. Must be a power of two of at least 2 MiB. Defaults to the file\'s current size' -r
complete -c vhost-user-pmem -l flush-mode -d 'How flush requests become fdatasyncs. Every mode answers a request only after an fdatasync that started after the request was taken off the queue has completed' -r -f -a "group\t'Group commit: one fdatasync answers every request waiting when it starts; the fastest'
serial\t'One fdatasync per request, one at a time (as Cloud Hypervisor and crosvm do)'
parallel\t'One fdatasync per request, up to 16 at once in a thread pool (as QEMU\'s own device does)'"
complete -c vhost-user-pmem -l metrics-path -d 'Write the metrics as JSON to this file: at start, every --metrics-interval seconds, on SIGUSR1, and at exit. Each write goes to FILE.tmp and is renamed over FILE, so readers never see a partial file' -r -F
complete -c vhost-user-pmem -l metrics-interval -d 'Seconds between periodic writes of --metrics-path [default: 10]. 0 writes only at start, on SIGUSR1 and at exit. Apart from these writes an idle daemon never wakes up' -r
complete -c vhost-user-pmem -l log-level -d 'The log filter when RUST_LOG is not set [default: info]. RUST_LOG, when set, wins. `off` prints nothing (warnings and errors are still counted in the metrics)' -r -f -a "error\t''
warn\t''
info\t''
debug\t''
trace\t''
off\t''"
complete -c vhost-user-pmem -l read-only -d 'Open the file read-only and map it into the guest without write permission. Every flush is answered with an error, since nothing the guest writes can become durable. QEMU 11.1 cannot map a read-only file (the guest then sees zeros; see docs/qemu.md)'
complete -c vhost-user-pmem -l print-capabilities -d 'Print the backend\'s capabilities as JSON on stdout, {"type": "pmem", "features": [...]} (the vhost-user backend convention), and exit 0. Needs no other option'
complete -c vhost-user-pmem -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-user-pmem -s V -l version -d 'Print version'
