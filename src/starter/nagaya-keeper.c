/* nagaya-keeper: keeps a user's images mounted on a node between runs (runtime/keeper.py says why and how;
 * THREAT_MODEL B28).
 *
 * Started by the first `nagaya run` of a kill domain that finds none (the compiled starter or the Python
 * launcher), as the user, never setuid:
 *
 *     nagaya-keeper DIRFD NAME IDLE STAGING
 *
 * DIRFD: the user's private starter directory (0700, checked by the caller), where NAME.sock and NAME.lock
 * live; NAME: keeper-<16 hex> (runtime/keeper.py key()); IDLE: seconds to stay after the last client has
 * gone; STAGING: a directory to mount a tmpfs over, in the keeper's own mount namespace only.
 * The first process takes the lock, listens and unshares, then forks the keeper proper and exits 0, so the
 * caller may connect as soon as it returns. Exit 3: another keeper holds the name (the caller waits for it
 * to listen); 2, 4, 5: bad arguments, no namespace or staging, a name that is not a plain file of the user's.
 *
 * Protocol, one request per connection: "mount\tOFFSET\tSERVER\n" with the image's fd (SCM_RIGHTS); the
 * reply "ok\n" with a detached clone of the image's mount (open_tree OPEN_TREE_CLONE), or "error\tWHY\n"
 * ("error\trefused\n": the server refused the file). The client holds its connection until it exits; the
 * keeper ends IDLE seconds after the last one closed, or as soon as none is open once the session's leader
 * has gone.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#define OPEN_TREE_CLONE_ 1
#define MAX_MOUNTS 64
#define MAX_CLIENTS 1024

struct kept {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
    long offset;
    char server[4096];
    char dir[4200];
    pid_t pid;
    int image;                          /* the image file, to see it removed */
    int live;
};

static struct kept mounts[MAX_MOUNTS];
static int clients[MAX_CLIENTS], nclients;
static char stage[4096];
static int counter;
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, data, strlen(data));
    close(fd);
    return n == (ssize_t)strlen(data) ? 0 : -1;
}

/* The name's lock, held for life: flock, then check that the locked file is still the one the name leads
   to (no first-come race, no lock on a file another keeper removed meanwhile). -1: another keeper has it;
   -2: the name is not a plain file of ours (nothing to wait for). */
static int take_lock(int dirfd, const char *name) {
    char lname[128];
    snprintf(lname, sizeof lname, "%s.lock", name);
    for (int tries = 0; tries < 3; tries++) {
        int fd = openat(dirfd, lname, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        struct stat st, now;
        if (fd < 0)
            return -2;                  /* e.g. a link at the name (O_NOFOLLOW) */
        if (fstat(fd, &st) || st.st_uid != getuid() || !S_ISREG(st.st_mode) || st.st_nlink != 1) {
            close(fd);
            return -2;
        }
        if (flock(fd, LOCK_EX | LOCK_NB)) {
            close(fd);
            return -1;
        }
        if (!fstatat(dirfd, lname, &now, AT_SYMLINK_NOFOLLOW) && now.st_dev == st.st_dev && now.st_ino == st.st_ino)
            return fd;
        close(fd);
    }
    return -1;
}

/* Remove the names of keepers that have ended (their lock is free): a pair per session would pile up. */
static void prune(int dirfd, const char *own) {
    int d = dup(dirfd);
    DIR *dir = d >= 0 ? fdopendir(d) : NULL;
    if (!dir)
        return;
    struct dirent *e;
    while ((e = readdir(dir))) {
        size_t n = strlen(e->d_name);
        if (strncmp(e->d_name, "keeper-", 7) || n < 6 || strcmp(e->d_name + n - 5, ".lock") ||
            (!strncmp(e->d_name, own, strlen(own)) && n == strlen(own) + 5))
            continue;
        int fd = openat(dirfd, e->d_name, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (!flock(fd, LOCK_EX | LOCK_NB)) {          /* still locked by us: no keeper can take it meanwhile */
            char sock[300];
            snprintf(sock, sizeof sock, "%.*s.sock", (int)(n - 5), e->d_name);
            unlinkat(dirfd, sock, 0);
            unlinkat(dirfd, e->d_name, 0);
        }
        close(fd);
    }
    closedir(dir);
}

static void drop(struct kept *k, int kill_it) {
    umount2(k->dir, MNT_DETACH);        /* clones in running containers keep it until they end */
    if (kill_it && k->pid > 0)
        kill(k->pid, SIGKILL);
    if (k->image >= 0)
        close(k->image);
    k->image = -1;
    k->live = 0;
}

/* An image removed from the cache (`image rm`, `cache gc`, a re-import) is let go at once, so that its space
   comes back: its server exits by itself once the last container using a clone of it has ended. */
static void let_go_of_removed(void) {
    struct stat st;
    for (int i = 0; i < MAX_MOUNTS; i++)
        if (mounts[i].live && mounts[i].image >= 0 && !fstat(mounts[i].image, &st) && st.st_nlink == 0)
            drop(&mounts[i], 0);
}

/* A server that died leaves a mount that fails every request: the next run gets a fresh one. */
static void reap(void) {
    pid_t pid;
    while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
        for (int i = 0; i < MAX_MOUNTS; i++)
            if (mounts[i].live && mounts[i].pid == pid) {
                mounts[i].pid = 0;
                drop(&mounts[i], 0);
            }
}

static pid_t start_server(const char *dir, int image, long offset, const char *server) {
    int fusefd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fusefd < 0)
        return -1;
    char opts[256];
    /* as the launcher mounts it (default_permissions: the kernel checks modes, as the overlay does) */
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_permissions", fusefd,
             (unsigned)getuid(), (unsigned)getgid());
    if (mount("nagaya", dir, "fuse.squashfuse", MS_NOSUID | MS_NODEV | MS_RDONLY, opts)) {
        close(fusefd);
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);   /* a keeper that is killed takes its servers along */
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        fcntl(image, F_SETFD, 0);
        fcntl(fusefd, F_SETFD, 0);
        char img[32], dev[32], off[64];
        snprintf(img, sizeof img, "/dev/fd/%d", image);
        snprintf(dev, sizeof dev, "/dev/fd/%d", fusefd);
        snprintf(off, sizeof off, "offset=%ld", offset);
        const char *base = strrchr(server, '/') ? strrchr(server, '/') + 1 : server;
        char *env[] = {"PATH=/usr/bin:/bin", NULL};
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (offset)
            execve(server, (char *[]){(char *)base, "-f", "-o", off, img, dev, NULL}, env);
        else
            execve(server, (char *[]){(char *)base, "-f", img, dev, NULL}, env);
        _exit(127);
    }
    close(fusefd);
    if (pid < 0)
        umount2(dir, MNT_DETACH);
    return pid;
}

/* The clone to send for this request, or -1 with *why set. */
static int serve_mount(const char *req, int image, const char **why) {
    char server[4096];
    long offset;
    int used = 0;
    if (image < 0 || sscanf(req, "mount\t%ld\t%4095[^\t\n]\n%n", &offset, server, &used) != 2 || used != (int)strlen(req) ||
        offset < 0 || server[0] != '/') {
        *why = "bad request";
        return -1;
    }
    struct stat st;
    if (fstat(image, &st) || !S_ISREG(st.st_mode)) {
        *why = "not a regular file";
        return -1;
    }
    reap();
    struct kept *k = NULL, *slot = NULL;
    for (int i = 0; i < MAX_MOUNTS && !k; i++) {
        struct kept *m = &mounts[i];
        if (!m->live) {
            if (!slot)
                slot = m;
            continue;
        }
        if (m->dev == st.st_dev && m->ino == st.st_ino && m->size == st.st_size && m->offset == offset &&
            m->mtime.tv_sec == st.st_mtim.tv_sec && m->mtime.tv_nsec == st.st_mtim.tv_nsec &&
            m->ctime.tv_sec == st.st_ctim.tv_sec && m->ctime.tv_nsec == st.st_ctim.tv_nsec && !strcmp(m->server, server))
            k = m;
    }
    if (!k) {
        if (!slot) {
            *why = "too many images";
            return -1;
        }
        k = slot;
        memset(k, 0, sizeof *k);
        k->dev = st.st_dev, k->ino = st.st_ino, k->size = st.st_size, k->offset = offset;
        k->mtime = st.st_mtim, k->ctime = st.st_ctim;
        snprintf(k->server, sizeof k->server, "%s", server);
        snprintf(k->dir, sizeof k->dir, "%s/%d", stage, ++counter);
        k->image = fcntl(image, F_DUPFD_CLOEXEC, 3);
        if (mkdir(k->dir, 0755) || (k->pid = start_server(k->dir, image, offset, server)) < 0) {
            if (k->image >= 0)
                close(k->image);
            *why = "cannot start the image's server";
            return -1;
        }
        k->live = 1;
        DIR *d = opendir(k->dir);       /* the first request: fails at once if the server refused the file */
        errno = 0;
        if (!d || (readdir(d) == NULL && errno)) {
            if (d)
                closedir(d);
            drop(k, 1);
            *why = "refused";
            return -1;
        }
        closedir(d);
    }
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, k->dir, OPEN_TREE_CLONE_ | O_CLOEXEC);
    if (fd < 0)
        *why = "open_tree failed";
    return fd;
}

static void answer(int conn) {
    struct timeval tv = {5, 0};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[4200];
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } ctl;
    struct iovec io = {req, sizeof req - 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    ssize_t n = recvmsg(conn, &m, MSG_CMSG_CLOEXEC);
    int image = -1;
    for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&m) : NULL; c; c = CMSG_NXTHDR(&m, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&image, CMSG_DATA(c), sizeof image);
    req[n > 0 ? n : 0] = 0;
    const char *why = "bad request";
    int clone = n > 0 && !(m.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) ? serve_mount(req, image, &why) : -1;
    if (image >= 0)
        close(image);
    if (clone >= 0) {
        struct iovec rio = {"ok\n", 3};
        struct msghdr r = {.msg_iov = &rio, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
        struct cmsghdr *c = CMSG_FIRSTHDR(&r);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &clone, sizeof clone);
        ssize_t sent = sendmsg(conn, &r, MSG_NOSIGNAL);
        close(clone);
        if (sent == 3 && nclients < MAX_CLIENTS) {
            clients[nclients++] = conn;         /* held by the client until it exits */
            return;
        }
    } else {
        char msg[128];
        int len = snprintf(msg, sizeof msg, "error\t%s\n", why);
        send(conn, msg, (size_t)len, MSG_NOSIGNAL);
    }
    close(conn);
}

int main(int argc, char **argv) {
    if (argc != 5)
        return 2;
    int dirfd = atoi(argv[1]);
    const char *name = argv[2];
    long idle = atol(argv[3]);
    size_t nl = strlen(name);
    if (nl != 23 || strncmp(name, "keeper-", 7) || strspn(name + 7, "0123456789abcdef") != 16 || idle <= 0 ||
        snprintf(stage, sizeof stage, "%s", argv[4]) >= (int)sizeof stage)
        return 2;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int sigs[] = {SIGHUP, SIGINT, SIGQUIT, SIGPIPE, SIGUSR1, SIGUSR2, SIGTSTP, SIGTTIN, SIGTTOU};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
        signal(sigs[i], SIG_IGN);
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    struct stat st;
    if (fstat(dirfd, &st) || !S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077))
        return 2;
    fcntl(dirfd, F_SETFD, FD_CLOEXEC);
    int lock = take_lock(dirfd, name);
    if (lock < 0)
        return lock == -1 ? 3 : 5;
    prune(dirfd, name);
    char sname[64], path[108];
    snprintf(sname, sizeof sname, "%s.sock", name);
    unlinkat(dirfd, sname, 0);          /* a keeper that ended without removing it (we hold the lock) */
    snprintf(path, sizeof path, "/proc/self/fd/%d/%s", dirfd, sname);
    int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, path, strlen(path) + 1);
    umask(077);
    if (lsock < 0 || bind(lsock, (struct sockaddr *)&addr, sizeof addr) || listen(lsock, 128))
        return 4;
    int leader = (int)syscall(SYS_pidfd_open, getsid(0), 0);
    uid_t uid = getuid();
    gid_t gid = getgid();
    char map[64], fdpath[64];
    int ok = !unshare(CLONE_NEWUSER | CLONE_NEWNS) && !write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
    ok = ok && !write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
    ok = ok && !write_file("/proc/self/gid_map", map) && !mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL);
    /* opened in this mount namespace (an fd of the host's could not be mounted on): the tmpfs hides it only
       here, where nothing but the keeper and its servers ever look */
    int sfd = ok ? open(stage, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) : -1;
    snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", sfd);
    ok = sfd >= 0 && !mount("tmpfs", fdpath, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700");
    if (!ok) {
        unlinkat(dirfd, sname, 0);
        return 4;
    }
    close(sfd);
    pid_t pid = fork();
    if (pid < 0) {
        unlinkat(dirfd, sname, 0);
        return 4;
    }
    if (pid > 0)
        _exit(0);                       /* the keeper proper is orphaned: no run's child */

    double since = mono();
    int leader_gone = 0;
    while (!stop) {
        reap();
        let_go_of_removed();
        if (!nclients && (leader_gone || mono() >= since + (double)idle))
            break;
        struct pollfd fds[MAX_CLIENTS + 2];
        int nf = 0;
        fds[nf++] = (struct pollfd){.fd = lsock, .events = POLLIN};
        if (leader >= 0 && !leader_gone)
            fds[nf++] = (struct pollfd){.fd = leader, .events = POLLIN};
        int first = nf;
        for (int i = 0; i < nclients; i++)
            fds[nf++] = (struct pollfd){.fd = clients[i], .events = POLLIN};
        /* wake at least every second: a dead server is reaped and its mount dropped */
        int timeout = 1000;
        if (!nclients) {
            double left = since + (double)idle - mono();
            timeout = left < 1 ? (int)(left * 1000) + 1 : 1000;
        }
        if (poll(fds, (nfds_t)nf, timeout) < 0)
            continue;
        if (leader >= 0 && !leader_gone && fds[1].revents)
            leader_gone = 1;
        for (int i = nf - 1; i >= first; i--) {
            if (!fds[i].revents)
                continue;
            int c = fds[i].fd;                 /* readable or hung up: a client sends nothing more, so it ended */
            close(c);
            for (int j = 0; j < nclients; j++)
                if (clients[j] == c) {
                    clients[j] = clients[--nclients];
                    break;
                }
            if (!nclients)
                since = mono();
        }
        if (fds[0].revents & POLLIN) {
            int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
            struct ucred cr;
            socklen_t crl = sizeof cr;
            if (conn >= 0 && (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cr, &crl) || cr.uid != uid)) {
                close(conn);        /* another user (shown here as the overflow uid): not ours to serve */
                conn = -1;
            }
            if (conn >= 0)
                answer(conn);
        }
    }
    /* our names first, while we hold the lock: a new keeper then makes fresh ones */
    unlinkat(dirfd, sname, 0);
    char lname[64];
    snprintf(lname, sizeof lname, "%s.lock", name);
    unlinkat(dirfd, lname, 0);
    for (int i = 0; i < MAX_MOUNTS; i++)
        if (mounts[i].live)
            drop(&mounts[i], 1);
    return 0;
}
