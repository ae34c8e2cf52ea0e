/*
 * pyctr-init: a tiny init for containers (`pyctr run --init`), doing docker-init's (tini's) job.
 *
 * Runs as PID 1 of the container: starts the command given after "--" as its child, forwards
 * every signal it receives to that child (SIGTERM from `pyctr tasks kill` reaches the real
 * program), reaps every zombie re-parented to it, and exits with the child's status (128 + the
 * signal number when the child was killed by a signal). When not PID 1 it registers as a child
 * subreaper so orphans still come to it.
 *
 * Built statically (no libc in a busybox rootfs is needed): see api/client/init/__init__.py.
 *
 *   pyctr-init [--] PROGRAM [ARG...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "pyctr-init: %s: %s\n", what, strerror(errno));
    exit(127);
}

int main(int argc, char **argv) {
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "--") == 0)
        first = 2;
    if (first >= argc) {
        fprintf(stderr, "usage: pyctr-init [--] PROGRAM [ARG...]\n");
        return 2;
    }

    if (getpid() != 1)
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

    /* Every signal waits in the mask until sigtimedwait picks it up; the child restores
     * the original mask before exec. */
    sigset_t all, orig;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGABRT);
    sigdelset(&all, SIGTRAP);
    sigdelset(&all, SIGSYS);
    if (sigprocmask(SIG_SETMASK, &all, &orig) != 0)
        die("sigprocmask");

    /* Let a foreground child of a terminal take the terminal over. */
    struct sigaction ign = {0};
    ign.sa_handler = SIG_IGN;
    sigaction(SIGTTIN, &ign, NULL);
    sigaction(SIGTTOU, &ign, NULL);

    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        struct sigaction dfl = {0};
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGTTIN, &dfl, NULL);
        sigaction(SIGTTOU, &dfl, NULL);
        setpgid(0, 0);
        if (isatty(STDIN_FILENO))
            tcsetpgrp(STDIN_FILENO, getpid());
        sigprocmask(SIG_SETMASK, &orig, NULL);
        execvp(argv[first], &argv[first]);
        fprintf(stderr, "pyctr-init: exec %s: %s\n", argv[first], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    setpgid(child, child);
    if (isatty(STDIN_FILENO))
        tcsetpgrp(STDIN_FILENO, child);

    int exit_code = -1;
    for (;;) {
        struct timespec tick = {1, 0};
        siginfo_t info;
        int sig = sigtimedwait(&all, &info, &tick);
        if (sig < 0 && errno != EAGAIN && errno != EINTR)
            die("sigtimedwait");
        if (sig > 0 && sig != SIGCHLD) {
            /* SIGSTOP-like job control signals of a terminal go to the whole group. */
            if (kill(child, sig) != 0 && errno != ESRCH)
                fprintf(stderr, "pyctr-init: forwarding signal %d: %s\n", sig, strerror(errno));
            continue;
        }
        /* SIGCHLD or a tick: reap everything that has exited. */
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid <= 0)
                break;
            if (pid == child) {
                if (WIFEXITED(status))
                    exit_code = WEXITSTATUS(status);
                else if (WIFSIGNALED(status))
                    exit_code = 128 + WTERMSIG(status);
                else
                    exit_code = 1;
            }
        }
        if (exit_code >= 0)
            return exit_code;
    }
}
