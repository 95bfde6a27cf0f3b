/* nagaya's compiled front (/usr/local/bin/nagaya, built by deploy/install.sh).
 *
 * Starting Python costs ~13 ms before nagaya does any work: more than bwrap needs for a whole container.
 * This starter replays the plain case -- `nagaya run|exec IMAGE CMD...` with no option, on an image in the
 * user's own cache -- from a plan the Python launcher wrote after an identical run (runtime/fastplan.py):
 * the same namespaces, staging tmpfs, squashfuse mount, overlay, generated /etc files, bwrap argv and
 * environment, signal forwarding and audit record. Everything else, and any doubt at all (an option, a
 * changed config file, image, ref, /etc/passwd, driver or nagaya source, an environment variable the config
 * reads, a plan that is not the user's own private file), execs the Python CLI, which decides as it always
 * did. `--gpus` is replayed too (the plan holds the staged driver files), and a batch job's record for
 * `nagaya job exec` is written as runtime/jobrecord.py writes it. The starter runs as the user: it is never
 * installed setuid, and refuses to run so.
 *
 * NAGAYA_STARTER=off always takes the Python path; NAGAYA_STARTER=debug says on stderr which path ran, and
 * why the Python one.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <locale.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <utime.h>

#ifndef NAGAYA_PYTHON
#define NAGAYA_PYTHON "/opt/nagaya/bin/python3"
#endif
#ifndef NAGAYA_PYLAUNCHER
#define NAGAYA_PYLAUNCHER "/opt/nagaya/bin/nagaya-py"
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x4       /* <linux/mount.h> clashes with glibc's <sys/mount.h> */
#endif
#define PLAN_FORMAT "nagaya-starter-plan 3"
#define PLAN_MAX (1 << 20)
#define SI_KERNEL_CODE 0x80

extern char **environ;

static int g_argc;
static char **g_argv;
static int g_debug;

/* ---- the Python path ------------------------------------------------------------------------------ */

/* The Python CLI, exactly as the old launcher script started it. `plan`: the run is one the starter could
   replay but its plan is missing or stale, so the Python launcher is asked (NAGAYA_STARTER_PLAN=want, which
   run_cmd removes from the environment before anything sees it) to write a fresh one; otherwise it writes
   none, and a Python run costs what it always did. */
static void python_path_for(const char *why, int plan) {
    if (g_debug)
        fprintf(stderr, "nagaya-starter: python path: %s\n", why);
    if (plan)
        setenv("NAGAYA_STARTER_PLAN", "want", 1);
    char **a = calloc((size_t)g_argc + 4, sizeof *a);
    if (!a)
        _exit(125);
    a[0] = NAGAYA_PYTHON;
    a[1] = "-IS";
    a[2] = NAGAYA_PYLAUNCHER;
    for (int i = 1; i < g_argc; i++)
        a[i + 2] = g_argv[i];
    execv(NAGAYA_PYTHON, a);
    fprintf(stderr, "nagaya: cannot start %s: %s\n", NAGAYA_PYTHON, strerror(errno));
    _exit(125);
}

static void python_path(const char *why) { python_path_for(why, 0); }
static void replan(const char *why) { python_path_for(why, 1); }

static void die(int code, const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(2, "nagaya: %s\n", buf);
    _exit(code);
}

/* ---- small helpers --------------------------------------------------------------------------------- */

static char *xstrdup(const char *s) {
    char *r = strdup(s);
    if (!r)
        die(125, "out of memory");
    return r;
}

static char *cat2(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *r = malloc(la + lb + 1);
    if (!r)
        die(125, "out of memory");
    memcpy(r, a, la);
    memcpy(r + la, b, lb + 1);
    return r;
}

static int starts(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

/* "0,1": what Python's args[i + 1].replace(",", "").isdigit() accepts, in ASCII */
static int is_index_list(const char *s) {
    int digits = 0;
    for (; *s; s++) {
        if (*s >= '0' && *s <= '9')
            digits++;
        else if (*s != ',')
            return 0;
    }
    return digits > 0;
}

struct strv {
    char **v;
    size_t n, cap;
};

static void sv_push(struct strv *s, char *x) {
    if (s->n + 2 > s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v)
            die(125, "out of memory");
    }
    s->v[s->n++] = x;
    s->v[s->n] = NULL;
}

/* ---- safefs's rules, in C --------------------------------------------------------------------------- */

/* A directory owned by root or a trusted uid, writable by no one else unless sticky (and that allowed). */
static int dir_ok(const struct stat *st, uid_t trusted, int shared_ok) {
    if (!S_ISDIR(st->st_mode))
        return 0;
    if (st->st_uid != 0 && st->st_uid != trusted)
        return 0;
    if ((st->st_mode & 022) && !(shared_ok && (st->st_mode & S_ISVTX)))
        return 0;
    return 1;
}

/* safefs.open_dir: walk from / without following a link an untrusted account made. -1 if unsafe. */
static int open_dir_safe(const char *path, uid_t trusted, int last_shared) {
    char *todo[256];
    size_t nt = 0;
    char *copy = xstrdup(path);
    if (path[0] != '/')
        return -1;
    for (char *t = strtok(copy, "/"); t; t = strtok(NULL, "/")) {
        if (nt >= 255)
            return -1;
        todo[nt++] = t;
    }
    int fd = open("/", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !dir_ok(&st, trusted, 1))
        return -1;
    int hops = 0;
    char *done[256];
    size_t nd = 0;
    size_t i = 0;
    while (i < nt) {
        char *name = todo[i++];
        if (!strcmp(name, "."))
            continue;
        if (!strcmp(name, ".."))
            goto bad;
        int nfd = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (nfd < 0) {
            /* a link a trusted account owns (a site's /home -> /export/home), followed from / again */
            struct stat lst;
            char target[4096];
            if (i >= nt || ++hops > 40 || fstatat(fd, name, &lst, AT_SYMLINK_NOFOLLOW) || !S_ISLNK(lst.st_mode) ||
                (lst.st_uid != 0 && lst.st_uid != trusted))
                goto bad;
            ssize_t n = readlinkat(fd, name, target, sizeof target - 1);
            if (n <= 0)
                goto bad;
            target[n] = 0;
            char *head[512];
            size_t nh = 0;
            if (target[0] != '/')
                for (size_t k = 0; k < nd; k++)
                    head[nh++] = done[k];
            char *tc = xstrdup(target);
            for (char *t = strtok(tc, "/"); t; t = strtok(NULL, "/")) {
                if (!strcmp(t, ".."))
                    nh = nh ? nh - 1 : 0;
                else if (strcmp(t, ".") && nh < 400)
                    head[nh++] = t;
            }
            for (; i < nt && nh < 500; i++)
                head[nh++] = todo[i];
            if (nh > 255)
                goto bad;
            memcpy(todo, head, nh * sizeof *head);
            nt = nh;
            i = 0;
            nd = 0;
            close(fd);
            fd = open("/", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0)
                return -1;
            continue;
        }
        close(fd);
        fd = nfd;
        done[nd++] = name;
        if (fstat(fd, &st) || !dir_ok(&st, trusted, i < nt || last_shared))
            goto bad;
    }
    return fd;
bad:
    close(fd);
    return -1;
}

/* safefs.open_at + check_file: a regular file of `owner` with one link, no link followed, no FIFO blocking. */
static int open_file_checked(int dirfd, const char *name, int flags, int create_mode, uid_t owner) {
    int fd = openat(dirfd, name, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | (create_mode ? O_CREAT : 0),
                    create_mode);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_nlink != 1 || st.st_uid != owner) {
        close(fd);
        errno = EPERM;
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

/* ---- the plan ---------------------------------------------------------------------------------------- */

struct upper_entry {
    char kind;          /* d: directory, f: file with content, h: copy of the host file */
    char *path, *data;
    mode_t mode;
};

struct plan {
    char *ref, *node, *name, *home, *groups, *digest, *squashfs, *lock, *touch, *staging, *staging_kind;
    char *squashfuse, *audit_file, *audit_site;
    uid_t uid;
    gid_t gid;
    long umask_v, unpack_threads;
    int pidns, audit_syslog, ended;
    long keeper;                                /* > 0: the image comes from the user's keeper, */
    char *keeper_exe;                           /* started from here when none answers */
    struct strv envprefix;                      /* NAGAYA_<SECTION>_: variables the config reads */
    struct strv tmpl, viewsrc, viewdst, viewkind, imgenv, entry, hostabsent;
    struct strv bypass;                         /* the image's top-level directories bound past the overlay */
    char *gpus;                                 /* the --gpus request the plan is for ("" none) */
    int gpupaths;
    struct strv gpusrc, gpurel, linkrel, linktarget, postenv;
    struct upper_entry *upper;
    size_t nupper;
};

static char *unescape(char *s) {
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r == '\\' && r[1]) {
            r++;
            *w++ = *r == 't' ? '\t' : *r == 'n' ? '\n' : *r;
        } else {
            *w++ = *r;
        }
    }
    *w = 0;
    return s;
}

static int fields(char *line, char **f, int max) {
    int n = 0;
    f[n++] = line;
    for (char *p = line; *p && n < max; p++)
        if (*p == '\t') {
            *p = 0;
            f[n++] = p + 1;
        }
    for (int i = 0; i < n; i++)
        unescape(f[i]);
    return n;
}

static int same_stat(const char *path, char **f) {
    struct stat st;
    if (stat(path, &st))
        return 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)st.st_dev);
    if (strcmp(buf, f[0]))
        return 0;
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)st.st_ino);
    if (strcmp(buf, f[1]))
        return 0;
    snprintf(buf, sizeof buf, "%lld", (long long)st.st_size);
    if (strcmp(buf, f[2]))
        return 0;
    if (!strcmp(f[3], "-"))
        return 1;       /* a file whose mtime moves on every run (the cache's LRU order): identity and size */
    snprintf(buf, sizeof buf, "%lld", (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
    return strcmp(buf, f[3]) == 0;
}

/* Parse and check every dependency; returns NULL (with *why) if the plan must not be used. */
static struct plan *load_plan(char *text, const char **why) {
    static struct plan p;
    char *save = NULL;
    char *line = strtok_r(text, "\n", &save);
    if (!line || strcmp(line, PLAN_FORMAT)) {
        *why = "plan of another format";
        return NULL;
    }
    while ((line = strtok_r(NULL, "\n", &save))) {
        char *f[8];
        int n = fields(line, f, 8);
        const char *k = f[0];
#define NEED(c) if (n < (c)) { *why = "malformed plan"; return NULL; }
        if (!strcmp(k, "end")) {
            p.ended = 1;
        } else if (!strcmp(k, "ref")) { NEED(2) p.ref = f[1];
        } else if (!strcmp(k, "node")) { NEED(2) p.node = f[1];
        } else if (!strcmp(k, "ident")) {
            NEED(6) p.uid = (uid_t)strtoul(f[1], NULL, 10);
            p.gid = (gid_t)strtoul(f[2], NULL, 10);
            p.groups = f[3];
            p.name = f[4];
            p.home = f[5];
        } else if (!strcmp(k, "umask")) { NEED(2) p.umask_v = strtol(f[1], NULL, 10);
        } else if (!strcmp(k, "digest")) { NEED(2) p.digest = f[1];
        } else if (!strcmp(k, "squashfs")) { NEED(2) p.squashfs = f[1];
        } else if (!strcmp(k, "lock")) { NEED(2) p.lock = f[1];
        } else if (!strcmp(k, "touch")) { NEED(2) p.touch = f[1];
        } else if (!strcmp(k, "staging")) { NEED(3) p.staging = f[1]; p.staging_kind = f[2];
        } else if (!strcmp(k, "pidns")) { NEED(2) p.pidns = atoi(f[1]);
        } else if (!strcmp(k, "keeper")) { NEED(3) p.keeper = strtol(f[1], NULL, 10); p.keeper_exe = f[2];
        } else if (!strcmp(k, "squashfuse")) { NEED(2) p.squashfuse = f[1];
        } else if (!strcmp(k, "unpack_threads")) { NEED(2) p.unpack_threads = strtol(f[1], NULL, 10);
        } else if (!strcmp(k, "audit_file")) { NEED(2) p.audit_file = f[1];
        } else if (!strcmp(k, "audit_site")) { NEED(2) p.audit_site = f[1];
        } else if (!strcmp(k, "audit_syslog")) { NEED(2) p.audit_syslog = atoi(f[1]);
        } else if (!strcmp(k, "envdep")) {
            NEED(3) const char *v = getenv(f[1]);
            if (!v || strcmp(v, f[2])) { *why = "an environment variable the config reads changed"; return NULL; }
        } else if (!strcmp(k, "envunset")) {
            NEED(2) if (getenv(f[1])) { *why = "an environment variable the config reads changed"; return NULL; }
        } else if (!strcmp(k, "dep")) {
            NEED(6) if (!same_stat(f[1], f + 2)) { *why = "a file the plan depends on changed"; return NULL; }
        } else if (!strcmp(k, "absent")) {
            NEED(2) struct stat st;
            if (stat(f[1], &st) == 0 || errno != ENOENT) { *why = "a file the plan depends on appeared"; return NULL; }
        } else if (!strcmp(k, "envprefix")) { NEED(2) sv_push(&p.envprefix, f[1]);
        } else if (!strcmp(k, "tmpl")) { NEED(2) sv_push(&p.tmpl, f[1]);
        } else if (!strcmp(k, "viewbind")) {
            NEED(4) sv_push(&p.viewsrc, f[1]);
            sv_push(&p.viewdst, f[2]);
            sv_push(&p.viewkind, f[3]);
        } else if (!strcmp(k, "gpus")) { NEED(2) p.gpus = f[1];
        } else if (!strcmp(k, "gpupaths")) { NEED(2) p.gpupaths = atoi(f[1]);
        } else if (!strcmp(k, "gpustage")) {
            NEED(3) if (strncmp(f[2], "lib/", 4) && strncmp(f[2], "bin/", 4)) { *why = "malformed plan"; return NULL; }
            if (strchr(f[2] + 4, '/') || !f[2][4] || f[2][4] == '.') { *why = "malformed plan"; return NULL; }
            sv_push(&p.gpusrc, f[1]);
            sv_push(&p.gpurel, f[2]);
        } else if (!strcmp(k, "gpulink")) {
            NEED(3) if ((strncmp(f[1], "lib/", 4) && strncmp(f[1], "bin/", 4)) || strchr(f[1] + 4, '/') ||
                        !f[1][4] || f[1][4] == '.') { *why = "malformed plan"; return NULL; }
            sv_push(&p.linkrel, f[1]);
            sv_push(&p.linktarget, f[2]);
        } else if (!strcmp(k, "postenv")) { NEED(2) sv_push(&p.postenv, f[1]);
        } else if (!strcmp(k, "content")) {
            NEED(3) char buf[4097];
            int fd = open(f[1], O_RDONLY | O_CLOEXEC);
            ssize_t n = fd >= 0 ? read(fd, buf, 4096) : -1;
            if (fd >= 0)
                close(fd);
            if (n < 0 || (size_t)n != strlen(f[2]) || memcmp(buf, f[2], (size_t)n)) {
                *why = "a file the plan depends on changed";
                return NULL;
            }
        } else if (!strcmp(k, "imgenv")) { NEED(2) sv_push(&p.imgenv, f[1]);
        } else if (!strcmp(k, "entry")) { NEED(2) sv_push(&p.entry, f[1]);
        } else if (!strcmp(k, "hostabsent")) { NEED(2) sv_push(&p.hostabsent, f[1]);
        } else if (!strcmp(k, "bypass")) {
            NEED(2) if (!f[1][0] || strchr(f[1], '/') || !strcmp(f[1], ".") || !strcmp(f[1], "..")) {
                *why = "malformed plan";
                return NULL;
            }
            sv_push(&p.bypass, f[1]);
        } else if (!strcmp(k, "upper")) {
            NEED(5) p.upper = realloc(p.upper, (p.nupper + 1) * sizeof *p.upper);
            if (!p.upper)
                die(125, "out of memory");
            struct upper_entry *u = &p.upper[p.nupper++];
            u->kind = f[1][0];
            u->path = f[2];
            u->mode = (mode_t)strtoul(f[3], NULL, 8) & 07777;
            u->data = f[4];
            if (!strchr("dfh", u->kind) || u->path[0] != '/' || strstr(u->path, "/..")) {
                *why = "malformed plan";
                return NULL;
            }
        } else {
            *why = "unknown plan entry";
            return NULL;
        }
#undef NEED
    }
    if (!p.gpus)
        p.gpus = "";
    if (!p.ended || !p.ref || !p.node || !p.name || !p.home || !p.digest || !p.squashfs || !p.lock || !p.touch ||
        !p.staging || !p.squashfuse || !p.audit_file || !p.audit_site || p.tmpl.n < 2 ||
        strcmp(p.tmpl.v[p.tmpl.n - 1], "--") || p.viewsrc.n != p.viewdst.n) {
        *why = "incomplete plan";
        return NULL;
    }
    return &p;
}

static uint64_t fnv1a(const char *a, const char *b, const char *c) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *s = (const unsigned char *)a; *s; s++)
        h = (h ^ *s) * 0x100000001b3ULL;
    h = (h ^ 0) * 0x100000001b3ULL;
    for (const unsigned char *s = (const unsigned char *)b; *s; s++)
        h = (h ^ *s) * 0x100000001b3ULL;
    if (*c) {
        h = (h ^ 0) * 0x100000001b3ULL;
        for (const unsigned char *s = (const unsigned char *)c; *s; s++)
            h = (h ^ *s) * 0x100000001b3ULL;
    }
    return h;
}

static int cmp_gid(const void *a, const void *b) {
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return x < y ? -1 : x > y;
}

static int groups_match(const char *planned, gid_t gid) {
    gid_t g[4096];
    int n = getgroups(4096, g);
    if (n < 0)
        return 0;
    int m = 0;
    for (int i = 0; i < n; i++)
        if (g[i] != gid)
            g[m++] = g[i];
    qsort(g, (size_t)m, sizeof *g, cmp_gid);
    /* Python keeps getgroups()'s duplicates too (a tuple): the plan lists them sorted */
    char buf[65536] = "";
    size_t off = 0;
    for (int i = 0; i < m && off < sizeof buf - 32; i++)
        off += (size_t)snprintf(buf + off, sizeof buf - off, "%s%u", i ? "," : "", (unsigned)g[i]);
    return strcmp(buf, planned) == 0;
}

/* ---- the container's view: runtime/rootpath.py ---------------------------------------------------- */

static struct plan *P;
static const char *ROOT;
static char found_host[8192];

static const char *host_path(const char *path, char *out, size_t len) {
    /* longest destination first, so that nested binds win */
    size_t best = (size_t)-1, bestlen = 0;
    for (size_t i = 0; i < P->viewdst.n; i++) {
        const char *d = P->viewdst.v[i];
        size_t dl = strlen(d);
        while (dl > 1 && d[dl - 1] == '/')
            dl--;
        int hit = !strcmp(path, d) || (!strncmp(path, d, dl) && path[dl] == '/') || (dl == 1 && d[0] == '/');
        if (hit && (best == (size_t)-1 || strlen(d) > bestlen)) {
            best = i;
            bestlen = strlen(d);
        }
    }
    if (best != (size_t)-1) {
        const char *d = P->viewdst.v[best];
        size_t dl = strlen(d);
        while (dl > 0 && d[dl - 1] == '/')
            dl--;
        snprintf(out, len, "%s%s", P->viewsrc.v[best], path + dl);
    } else {
        snprintf(out, len, "%s%s", ROOT, path);
    }
    return out;
}

/* RootView.resolve: symlinks followed inside the container; 0 if a component is missing. */
static int resolve(const char *path, char *done, size_t len) {
    char parts[16384];
    snprintf(parts, sizeof parts, "%s", path);
    strcpy(done, "/");
    int links = 0;
    char *rest = parts;
    while (*rest) {
        while (*rest == '/')
            rest++;
        if (!*rest)
            break;
        char *slash = strchr(rest, '/');
        char comp[4096];
        size_t cl = slash ? (size_t)(slash - rest) : strlen(rest);
        if (cl >= sizeof comp)
            return 0;
        memcpy(comp, rest, cl);
        comp[cl] = 0;
        rest += cl;
        if (!strcmp(comp, "."))
            continue;
        if (!strcmp(comp, "..")) {
            char *s = strrchr(done, '/');
            if (s == done)
                done[1] = 0;
            else if (s)
                *s = 0;
            continue;
        }
        char cand[8192], hp[8192];
        snprintf(cand, sizeof cand, "%s%s%s", done, strcmp(done, "/") ? "/" : "", comp);
        struct stat st;
        if (lstat(host_path(cand, hp, sizeof hp), &st))
            return 0;
        if (S_ISLNK(st.st_mode)) {
            if (++links > 40)
                return 0;
            char target[4096];
            ssize_t n = readlink(hp, target, sizeof target - 1);
            if (n < 0)
                return 0;
            target[n] = 0;
            char next[16384];
            snprintf(next, sizeof next, "%s/%s", target, rest);
            snprintf(parts, sizeof parts, "%s", next);
            rest = parts;
            if (target[0] == '/')
                strcpy(done, "/");
        } else {
            snprintf(done, len, "%s", cand);
        }
    }
    return 1;
}

/* RootView._check_exec: 0 found, else the reason. */
static const char *check_exec(const char *path) {
    char real[8192], hp[8192];
    struct stat st;
    if (!resolve(path, real, sizeof real))
        return "not found";
    host_path(real, hp, sizeof hp);
    if (stat(hp, &st))
        return "not found";
    if (S_ISDIR(st.st_mode))
        return "is a directory";
    if (access(hp, X_OK))
        return "permission denied";
    snprintf(found_host, sizeof found_host, "%s", hp);
    return NULL;
}

static const char *find_command(const char *cmd, const char *path_var, const char *cwd) {
    char full[8192];
    if (strchr(cmd, '/')) {
        if (cmd[0] == '/')
            return check_exec(cmd);
        snprintf(full, sizeof full, "%s%s%s", cwd, cwd[strlen(cwd) - 1] == '/' ? "" : "/", cmd);
        return check_exec(full);
    }
    const char *last = "not found";
    char *pv = xstrdup(path_var && *path_var ? path_var : "/usr/local/bin:/usr/bin:/bin");
    char *s = pv;
    for (;;) {
        char *colon = strchr(s, ':');
        if (colon)
            *colon = 0;
        const char *d = *s ? s : cwd;
        if (cmd[0] == '/' || !strlen(d))
            snprintf(full, sizeof full, "%s", cmd);
        else
            snprintf(full, sizeof full, "%s%s%s", d, d[strlen(d) - 1] == '/' ? "" : "/", cmd);
        const char *r = check_exec(full);
        if (!r)
            return NULL;
        if (strcmp(r, "not found"))
            last = r;
        if (!colon)
            break;
        s = colon + 1;
    }
    return last;
}

/* ---- the container's environment: runtime/environment.py ------------------------------------------ */

struct env {
    struct strv kv;     /* "K=V", in Python dict order (an update keeps a key's place) */
};

static void env_set(struct env *e, const char *k, size_t kl, const char *v, int only_if_absent) {
    for (size_t i = 0; i < e->kv.n; i++)
        if (!strncmp(e->kv.v[i], k, kl) && e->kv.v[i][kl] == '=') {
            if (only_if_absent)
                return;
            char *n = malloc(kl + strlen(v) + 2);
            sprintf(n, "%.*s=%s", (int)kl, k, v);
            e->kv.v[i] = n;
            return;
        }
    char *n = malloc(kl + strlen(v) + 2);
    sprintf(n, "%.*s=%s", (int)kl, k, v);
    sv_push(&e->kv, n);
}

static const char *env_get(struct env *e, const char *k) {
    size_t kl = strlen(k);
    for (size_t i = 0; i < e->kv.n; i++)
        if (!strncmp(e->kv.v[i], k, kl) && e->kv.v[i][kl] == '=')
            return e->kv.v[i] + kl + 1;
    return NULL;
}

static int dropped(const char *kv) {
    static const char *drop[] = {"PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT", "PS1", "PROMPT_COMMAND",
                                 "BASH_ENV", "ENV", "PYTHONHOME", NULL};
    size_t kl = strcspn(kv, "=");
    for (int i = 0; drop[i]; i++)
        if (strlen(drop[i]) == kl && !strncmp(kv, drop[i], kl))
            return 1;
    return starts(kv, "NAGAYAENV_") || starts(kv, "BASH_FUNC_");
}

/* What Python does at start-up (PEP 538) and so the Python launcher passes into the container: under the
   legacy C locale, with LC_ALL unset, LC_CTYPE=C.UTF-8 (or the first of C.utf8, UTF-8 that exists). */
static void coerce_c_locale(void) {
    const char *all = getenv("LC_ALL");
    if (all && *all)
        return;
    const char *loc = setlocale(LC_CTYPE, "");
    if (!loc || (strcmp(loc, "C") && strcmp(loc, "POSIX")))
        return;
    static const char *targets[] = {"C.UTF-8", "C.utf8", "UTF-8", NULL};
    for (int k = 0; targets[k]; k++)
        if (setlocale(LC_CTYPE, targets[k])) {
            setenv("LC_CTYPE", targets[k], 1);
            break;
        }
    setlocale(LC_CTYPE, "C");
}

static void build_env(struct env *e) {
    for (char **p = environ; *p; p++) {
        const char *eq = strchr(*p, '=');
        if (!eq || eq == *p || dropped(*p))
            continue;
        env_set(e, *p, (size_t)(eq - *p), eq + 1, 0);
    }
    for (size_t i = 0; i < P->imgenv.n; i++) {
        const char *it = P->imgenv.v[i], *eq = strchr(it, '=');
        if (eq && eq != it)
            env_set(e, it, (size_t)(eq - it), eq + 1, 0);
    }
    for (char **p = environ; *p; p++) {
        const char *eq = strchr(*p, '=');
        if (eq && starts(*p, "NAGAYAENV_") && eq - *p > 10)
            env_set(e, *p + 10, (size_t)(eq - *p - 10), eq + 1, 0);
    }
    env_set(e, "PATH", 4, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
    env_set(e, "HOME", 4, P->home, 0);
    env_set(e, "USER", 4, P->name, 1);
    env_set(e, "LOGNAME", 7, P->name, 1);
    for (size_t i = 0; i < P->postenv.n; i++) {       /* --gpus: the devices' variables */
        const char *it = P->postenv.v[i], *eq = strchr(it, '=');
        if (eq && eq != it)
            env_set(e, it, (size_t)(eq - it), eq + 1, 0);
    }
    env_set(e, "NAGAYA_CONTAINER", 16, P->ref, 0);
    env_set(e, "NAGAYA_IMAGE_DIGEST", 19, P->digest, 0);
    if (P->gpupaths) {
        const char *ld = env_get(e, "LD_LIBRARY_PATH");
        char *v = ld && *ld ? cat2(cat2(ld, ":"), "/.nagaya/gpu/lib") : xstrdup("/.nagaya/gpu/lib");
        env_set(e, "LD_LIBRARY_PATH", 15, v, 0);
        env_set(e, "PATH", 4, cat2(cat2(env_get(e, "PATH"), ":"), "/.nagaya/gpu/bin"), 0);
    }
}

/* ---- the audit record: nagaya.audit --------------------------------------------------------------- */

struct buf {
    char *s;
    size_t n, cap;
};

static void b_put(struct buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->s = realloc(b->s, b->cap);
        if (!b->s)
            die(125, "out of memory");
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void b_str(struct buf *b, const char *s) { b_put(b, s, strlen(s)); }

static void b_u(struct buf *b, unsigned cp) {
    char t[16];
    snprintf(t, sizeof t, "\\u%04x", cp);
    b_str(b, t);
}

/* A JSON string as Python's json.dumps (ensure_ascii) writes os.fsdecode()'s text: UTF-8 decoded, bytes
   that are not valid UTF-8 as lone surrogates U+DC80..U+DCFF (surrogateescape). */
static void b_json(struct buf *b, const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    b_str(b, "\"");
    while (*s) {
        unsigned c = *s, cp = 0;
        int len = 0;
        if (c < 0x80) {
            if (c == '"')
                b_str(b, "\\\"");
            else if (c == '\\')
                b_str(b, "\\\\");
            else if (c == '\n')
                b_str(b, "\\n");
            else if (c == '\r')
                b_str(b, "\\r");
            else if (c == '\t')
                b_str(b, "\\t");
            else if (c == '\b')
                b_str(b, "\\b");
            else if (c == '\f')
                b_str(b, "\\f");
            else if (c < 0x20)
                b_u(b, c);
            else
                b_put(b, (const char *)s, 1);
            s++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
        int ok = len > 0;
        for (int i = 1; ok && i < len; i++) {
            if ((s[i] & 0xc0) != 0x80)
                ok = 0;
            else
                cp = (cp << 6) | (s[i] & 0x3f);
        }
        if (ok && ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                   (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
            ok = 0;
        if (!ok) {
            b_u(b, 0xdc00 + c);
            s++;
            continue;
        }
        if (cp >= 0x10000) {
            cp -= 0x10000;
            b_u(b, 0xd800 + (cp >> 10));
            b_u(b, 0xdc00 + (cp & 0x3ff));
        } else {
            b_u(b, cp);
        }
        s += len;
    }
    b_str(b, "\"");
}

static void mkdirs(const char *path) {
    char *p = xstrdup(path);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = 0;
            mkdir(p, 0777);
            *s = '/';
        }
    mkdir(p, 0777);
    free(p);
}

static void audit(struct strv *argv, const char *host_cwd, const char *cwd, int code, double duration,
                  int spool_fd) {
    struct utsname u;
    uname(&u);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    char when[64], id[13], num[64];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + strlen(when), sizeof when - strlen(when), ".%03ldZ", now.tv_nsec / 1000000);
    unsigned char rnd[6];
    int rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rfd < 0 || read(rfd, rnd, 6) != 6)
        memset(rnd, 0, sizeof rnd);
    if (rfd >= 0)
        close(rfd);
    for (int i = 0; i < 6; i++)
        sprintf(id + 2 * i, "%02x", rnd[i]);
    /* round(duration, 4) as Python prints it: shortest form, at least one digit after the point */
    snprintf(num, sizeof num, "%.4f", duration);
    char *e = num + strlen(num) - 1;
    while (*e == '0' && e[-1] != '.')
        *e-- = 0;
    struct buf b = {0};
    b_str(&b, "{\"action\":\"run\",\"command\":[");
    for (size_t i = 0; i < argv->n; i++) {
        if (i)
            b_str(&b, ",");
        b_json(&b, argv->v[i]);
    }
    b_str(&b, "],\"cwd\":");
    b_json(&b, host_cwd);
    b_str(&b, ",\"details\":{\"backend\":\"bwrap\",");
    if (*P->gpus) {
        b_str(&b, "\"gpus\":");
        b_json(&b, P->gpus);
        b_str(&b, ",");
    }
    b_str(&b, "\"pwd\":");
    b_json(&b, cwd);
    b_str(&b, "},\"digest\":");
    b_json(&b, P->digest);
    b_str(&b, ",\"duration_s\":");
    b_str(&b, num);
    snprintf(num, sizeof num, ",\"exit_code\":%d,\"host\":", code);
    b_str(&b, num);
    b_json(&b, u.nodename);
    b_str(&b, ",\"id\":\"");
    b_str(&b, id);
    b_str(&b, "\",\"image\":");
    b_json(&b, P->ref);
    b_str(&b, ",\"time\":\"");
    b_str(&b, when);
    snprintf(num, sizeof num, "\",\"uid\":%u,\"user\":", (unsigned)P->uid);
    b_str(&b, num);
    b_json(&b, P->name);
    b_str(&b, "}");
    size_t line_len = b.n;
    b_str(&b, "\n");

    char *dir = xstrdup(P->audit_file);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        mkdirs(dir);
    }
    int fd = open(P->audit_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, b.s, b.n) < 0) { /* auditing never makes the user's command fail */ }
        close(fd);
    }
    if (P->audit_site[0] && spool_fd >= 0) {
        /* safefs.append_own: USER.jsonl, USER.1.jsonl, then a fresh unguessable name */
        char names[3][512];
        snprintf(names[0], sizeof names[0], "%s.jsonl", P->name);
        snprintf(names[1], sizeof names[1], "%s.1.jsonl", P->name);
        unsigned char r8[8];
        rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (rfd < 0 || read(rfd, r8, 8) != 8)
            memset(r8, 0x5a, sizeof r8);
        if (rfd >= 0)
            close(rfd);
        char hex[17];
        for (int i = 0; i < 8; i++)
            sprintf(hex + 2 * i, "%02x", r8[i]);
        snprintf(names[2], sizeof names[2], "%s.%s.jsonl", P->name, hex);
        for (int i = 0; i < 3; i++) {
            fd = open_file_checked(spool_fd, names[i], O_WRONLY | O_APPEND, 0600, getuid());
            if (fd < 0)
                continue;
            ssize_t w = write(fd, b.s, b.n);
            close(fd);
            if (w >= 0)
                break;
        }
    }
    if (P->audit_syslog) {
        int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strcpy(a.sun_path, "/dev/log");
        if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
            char *msg = malloc(line_len + 64);
            int n = sprintf(msg, "<86>nagaya[%d]: %.*s", (int)getpid(), (int)line_len, b.s);
            send(s, msg, n > 8000 ? 8000 : (size_t)n, 0);
        }
        if (s >= 0)
            close(s);
    }
}

/* ---- the batch job's record for `nagaya job exec`: runtime/jobrecord.py ---------------------------- */

static int all_digits(const char *s) {
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* jobrecord.job_key + record_name: 0 outside a batch job (or with a key that cannot be a plain name) */
static int job_record_name(char *out, size_t len) {
    const char *batch = getenv("NAGAYA_BATCH_JOB");
    char b[256];
    if (batch && snprintf(b, sizeof b, "%s", batch) < (int)sizeof b) {
        char *sp = strchr(b, ' ');
        if (sp && !strchr(sp + 1, ' ') && (!strncmp(b, "gridengine ", 11) || !strncmp(b, "pbs ", 4))) {
            *sp = 0;
            char *job = sp + 1, *dot = strchr(job, '.');
            int ok = dot ? (*dot = 0, all_digits(job) && all_digits(dot + 1)) : all_digits(job);
            if (dot)
                *dot = '.';
            if (ok) {
                const char *rank = getenv("NAGAYA_NODE_RANK");
                struct utsname u;
                uname(&u);
                snprintf(out, len, "%s-%s-0.%s@%s.json", b, job, all_digits(rank) ? rank : "0", u.nodename);
                return 1;
            }
        }
    }
    const char *sj = getenv("SLURM_JOB_ID");
    if (all_digits(sj)) {
        const char *step = getenv("SLURM_STEP_ID"), *task = getenv("SLURM_PROCID"), *node = getenv("SLURMD_NODENAME");
        if (!step || !*step)
            step = "batch";
        if (!task || !*task)
            task = "0";
        if (!(all_digits(step) || !strcmp(step, "batch") || !strcmp(step, "extern") || !strcmp(step, "interactive")) ||
            !all_digits(task))
            return 0;
        struct utsname u;
        uname(&u);
        snprintf(out, len, "slurm-%s-%s.%s@%s.json", sj, step, task, node && *node ? node : u.nodename);
        return 1;
    }
    const char *lj = getenv("NAGAYA_JOB_ID");
    if (all_digits(lj)) {
        struct utsname u;
        uname(&u);
        snprintf(out, len, "local-%s-0.0@%s.json", lj, u.nodename);
        return 1;
    }
    return 0;
}

/* jobrecord.open_dir(create=True): /tmp/.nagaya-jobs-UID, the user's alone */
static int job_record_dir(void) {
    char d[64];
    snprintf(d, sizeof d, "/tmp/.nagaya-jobs-%u", (unsigned)getuid());
    mkdir(d, 0700);
    int fd = open_dir_safe(d, getuid(), 0);
    struct stat st;
    if (fd >= 0 && (fstat(fd, &st) || st.st_uid != getuid() || (st.st_mode & 077))) {
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        dprintf(2, "nagaya: note: no record for `nagaya job exec`: %s is not yours alone\n", d);
    return fd;
}

static void proc_start_time(pid_t pid, char *out, size_t len) {
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    *out = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *r = strrchr(buf, ')');
    if (!r)
        return;
    /* fields after the command: state is the 1st, starttime the 20th */
    char *save = NULL, *tok = strtok_r(r + 1, " ", &save);
    for (int i = 1; tok && i < 20; i++)
        tok = strtok_r(NULL, " ", &save);
    if (tok)
        snprintf(out, len, "%s", tok);
}

/* jobrecord.write: json.dumps of the same record, under a temp name and renamed */
static int write_job_record(int dfd, const char *name, pid_t bpid, const char *cwd, struct strv *argv,
                            struct strv *envkv) {
    struct buf b = {0};
    char num[256], start[64];
    struct stat su, sp;
    proc_start_time(getpid(), start, sizeof start);
    if (stat("/proc/self/ns/user", &su) || stat("/proc/self/ns/pid_for_children", &sp))
        return -1;
    snprintf(num, sizeof num, "{\"pid\": %d, \"start\": \"%s\", \"backend_pid\": %d, \"userns\": %llu, "
             "\"pidns\": %llu, \"uid\": %u, \"cwd\": ", (int)getpid(), start, (int)bpid,
             (unsigned long long)su.st_ino, (unsigned long long)sp.st_ino, (unsigned)getuid());
    b_str(&b, num);
    b_json(&b, cwd);
    b_str(&b, ", \"env\": {");
    for (size_t k = 0; k < envkv->n; k++) {
        const char *kv = envkv->v[k], *eq = strchr(kv, '=');
        char *key = strndup(kv, (size_t)(eq - kv));
        b_str(&b, k ? ", " : "");
        b_json(&b, key);
        b_str(&b, ": ");
        b_json(&b, eq + 1);
        free(key);
    }
    b_str(&b, "}, \"argv\": [");
    for (size_t k = 0; k < argv->n; k++) {
        b_str(&b, k ? ", " : "");
        b_json(&b, argv->v[k]);
    }
    b_str(&b, "], \"image\": ");
    b_json(&b, P->ref);
    b_str(&b, ", \"digest\": ");
    b_json(&b, P->digest);
    b_str(&b, ", \"backend\": \"bwrap\"}");
    char tmp[1024];
    snprintf(tmp, sizeof tmp, ".%s.%d.tmp", name, (int)getpid());
    int fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, b.s, b.n);
    close(fd);
    if (w != (ssize_t)b.n || renameat(dfd, tmp, dfd, name)) {
        unlinkat(dfd, tmp, 0);
        return -1;
    }
    return 0;
}

/* jobrecord.prune: the records of runs killed outright (their supervisor gone, or its pid reused) */
static void prune_job_records(int dfd, const char *keep) {
    int d2 = dup(dfd);
    DIR *d = d2 >= 0 ? fdopendir(d2) : NULL;
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t nl = strlen(de->d_name);
        if (!strcmp(de->d_name, keep) || nl < 5 || strcmp(de->d_name + nl - 5, ".json"))
            continue;
        int fd = openat(dfd, de->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = 0;
        char *pp = strstr(buf, "\"pid\":"), *ps = strstr(buf, "\"start\":");
        if (!pp || !ps)
            continue;
        long pid = strtol(pp + 6, NULL, 10);
        char *q1 = strchr(ps + 8, '"'), *q2 = q1 ? strchr(q1 + 1, '"') : NULL;
        if (pid <= 0 || !q2)
            continue;
        char start[64], now[64];
        snprintf(start, sizeof start, "%.*s", (int)(q2 - q1 - 1), q1 + 1);
        char path[64];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        struct stat st;
        if (stat(path, &st) == 0) {
            proc_start_time((pid_t)pid, now, sizeof now);
            if (!strcmp(now, start))
                continue;
        } else if (errno != ENOENT) {
            continue;
        }
        unlinkat(dfd, de->d_name, 0);
    }
    closedir(d);
}

/* ---- supervision: launcher._supervise / _forward --------------------------------------------------- */

static int read_stat(pid_t pid, char *state, pid_t *ppid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *r = strrchr(buf, ')');
    if (!r)
        return -1;
    char st;
    int pp;
    if (sscanf(r + 1, " %c %d", &st, &pp) != 2)
        return -1;
    if (state)
        *state = st;
    *ppid = pp;
    return 0;
}

/* The image's FUSE server, by its comm: squashfuse_ll or nagaya's own (config.py's FUSE_SERVER_COMMS). */
static int is_fuse_server(const char *comm) {
    return starts(comm, "squashfuse") || starts(comm, "nagaya-squashfs");
}

/* The app: the backend's child that is not the FUSE server (lowest pid first, as Python sorts). */
static pid_t first_leaf(pid_t bpid) {
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    pid_t kids[256];
    int nk = 0;
    struct dirent *de;
    while ((de = readdir(d)) && nk < 256) {
        if (!isdigit((unsigned char)de->d_name[0]))
            continue;
        pid_t pid = atoi(de->d_name), pp;
        if (read_stat(pid, NULL, &pp) == 0 && pp == bpid)
            kids[nk++] = pid;
    }
    closedir(d);
    qsort(kids, (size_t)nk, sizeof *kids, cmp_gid);
    for (int i = 0; i < nk; i++) {
        char path[64], comm[64] = "";
        snprintf(path, sizeof path, "/proc/%d/comm", (int)kids[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, comm, sizeof comm - 1);
        close(fd);
        if (n < 0)
            continue;
        comm[n < 0 ? 0 : n] = 0;
        if (is_fuse_server(comm))
            continue;
        return kids[i];
    }
    return 0;
}

static int in_subtree(pid_t pid, pid_t root) {
    for (int i = 0; i < 64; i++) {
        if (pid == root)
            return 1;
        pid_t pp;
        if (read_stat(pid, NULL, &pp))
            return 0;
        pid = pp;
        if (pid <= 1)
            return 0;
    }
    return 0;
}

static int pending(pid_t pid, int sig) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    for (char *l = buf; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (starts(l, "SigPnd:") || starts(l, "ShdPnd:")) {
            unsigned long long m = strtoull(l + 7, NULL, 16);
            if (m & (1ULL << (sig - 1)))
                return 1;
        }
    return 0;
}

static const int FORWARD[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM};

static int supervise(pid_t bpid, int st_r) {
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof FORWARD / sizeof *FORWARD; i++)
        sigaddset(&set, FORWARD[i]);
    sigaddset(&set, SIGCHLD);
    struct buf status = {0};
    for (;;) {
        siginfo_t info;
        if (sigwaitinfo(&set, &info) < 0)
            continue;
        if (info.si_signo == SIGCHLD) {
            for (;;) {
                int ws = 0;
                pid_t pid = waitpid(-1, &ws, WNOHANG);
                if (pid < 0 && errno == ECHILD) {
                    pid = bpid;
                    ws = 0;
                }
                if (pid <= 0)
                    break;
                if (pid == bpid) {
                    char tmp[4096];
                    ssize_t n;
                    fcntl(st_r, F_SETFL, O_NONBLOCK);
                    while ((n = read(st_r, tmp, sizeof tmp)) > 0)
                        b_put(&status, tmp, (size_t)n);
                    int code = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
                    if (!status.s || !strstr(status.s, "child-pid"))
                        return -1 - code;       /* never started: -1 - bwrap's exit code */
                    return code;
                }
            }
            continue;
        }
        int sig = info.si_signo;
        if (info.si_code == SI_KERNEL_CODE)
            continue;       /* from the terminal: the app, in our process group, has it too */
        pid_t app = first_leaf(bpid);
        if (!app)
            continue;
        if (info.si_pid && in_subtree(info.si_pid, bpid))
            continue;       /* the container signalled its own process group */
        if (pending(app, sig))
            continue;       /* a group-wide signal the app got directly: do not double it */
        kill(app, sig);
    }
}

/* ---- the run ---------------------------------------------------------------------------------------- */

static void write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, data, strlen(data)) < 0)
        die(125, "container setup failed: %s: %s", path, strerror(errno));
    close(fd);
}

static int is_regular(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static const char *SYSTEM_DIRS[] = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                                    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var",
                                    NULL};
static const char *SYSTEM_TREES[] = {"/bin/", "/boot/", "/dev/", "/etc/", "/lib", "/proc/", "/run/", "/sbin/",
                                     "/sys/", "/usr/", NULL};

static int under(const char *path, const char *dir) {
    size_t dl = strlen(dir);
    while (dl > 1 && dir[dl - 1] == '/')
        dl--;
    return !strncmp(path, dir, dl) && (path[dl] == '/' || path[dl] == 0);
}

/* launcher._stage_gpu_dir: the driver's files bound read-only into one directory of the staging tmpfs, with
   their soname links, which bwrap then binds as /.nagaya (one bind for it instead of one per file). */
static void stage_gpu_dir(const char *stage) {
    if (!P->gpusrc.n && !P->linkrel.n)
        return;
    char top[4096], sub[4096];
    snprintf(top, sizeof top, "%s/gpu", stage);
    const char *subs[] = {"", "/lib", "/bin"};
    for (int k = 0; k < 3; k++) {
        snprintf(sub, sizeof sub, "%s%s", top, subs[k]);
        if (mkdir(sub, 0755))
            die(125, "container setup failed: %s: %s", sub, strerror(errno));
    }
    for (size_t k = 0; k < P->gpusrc.n; k++) {
        char target[8192];
        snprintf(target, sizeof target, "%s/%s", top, P->gpurel.v[k]);
        int fd = open(target, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
        if (mount(P->gpusrc.v[k], target, NULL, MS_BIND, NULL))
            die(125, "container setup failed: %s: %s", P->gpusrc.v[k], strerror(errno));
        struct statvfs sv;
        if (statvfs(P->gpusrc.v[k], &sv) == 0) {     /* read-only, keeping the flags the kernel locks */
            unsigned long locked = sv.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048);
            if (sv.f_flag & 4096)
                locked |= MS_RELATIME;
            mount("none", target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | locked, NULL);
        }
    }
    for (size_t k = 0; k < P->linkrel.n; k++) {
        char link[8192];
        snprintf(link, sizeof link, "%s/%s", top, P->linkrel.v[k]);
        if (symlink(P->linktarget.v[k], link))
            die(125, "container setup failed: %s: %s", link, strerror(errno));
    }
}

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* `nagaya submit` on Grid Engine and PBS from a submit plan: its own file, in this translation unit */
#include "submit.c"

/* runtime/keeper.py's name for this process's kill domain (key()): FNV-1a 64 of the node name, the cgroups,
   the sorted distinct groups and the session, NUL-separated */
static void keeper_name(const char *node, char *out, size_t len) {
    uint64_t h = 0xcbf29ce484222325ULL;
#define FNV(b) (h = (h ^ (unsigned char)(b)) * 0x100000001b3ULL)
    for (const char *c = node; *c; c++)
        FNV(*c);
    FNV(0);
    int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    char buf[4096];
    ssize_t n;
    while (fd >= 0 && (n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t k = 0; k < n; k++)
            FNV(buf[k]);
    if (fd >= 0)
        close(fd);
    FNV(0);
    gid_t gs[4096];
    int ng = getgroups(4096, gs);
    qsort(gs, ng > 0 ? (size_t)ng : 0, sizeof *gs, cmp_gid);
    for (int k = 0, first = 1; k < ng; k++) {
        if (k && gs[k] == gs[k - 1])
            continue;
        char num[32];
        snprintf(num, sizeof num, first ? "%u" : ",%u", (unsigned)gs[k]);
        first = 0;
        for (char *c = num; *c; c++)
            FNV(*c);
    }
    FNV(0);
    char sid[32];
    snprintf(sid, sizeof sid, "%d", (int)getsid(0));
    for (char *c = sid; *c; c++)
        FNV(*c);
#undef FNV
    snprintf(out, len, "keeper-%016llx", (unsigned long long)h);
}

/* A connection to this user's keeper, checked to be theirs (SO_PEERCRED), or -1. */
static int keeper_connect(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    struct ucred cr;
    socklen_t crl = sizeof cr;
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) ||
        getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &crl) || cr.uid != getuid()) {
        if (s >= 0)
            close(s);
        return -1;
    }
    return s;
}

/* Start a keeper (nagaya-keeper.c) as keeper.py's _start does: its first process exits once it listens (0),
   or at once when another keeper has the name (3). Its exit status, or -1. */
static int keeper_start(int dfd, const char *name) {
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        fcntl(dfd, F_SETFD, 0);
        char fdnum[16], idle[32];
        snprintf(fdnum, sizeof fdnum, "%d", dfd);
        snprintf(idle, sizeof idle, "%ld", P->keeper);
        char *kargv[] = {"nagaya-keeper", fdnum, (char *)name, idle, P->staging, NULL};
        char *kenv[] = {NULL};
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(P->keeper_exe, kargv, kenv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0)
        return -1;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* A detached clone of the keeper's mount of the image (runtime/keeper.py; THREAT_MODEL B28), or -1 when no
   keeper answers even after starting one (the run then mounts the image itself). *conn: held open
   (close-on-exec) while the container runs, as the keeper counts its clients. Dies with the launcher's
   words if the image is refused. */
static int keeper_mount(int dfd, const char *node, int *conn) {
    char name[64], path[108];
    keeper_name(node, name, sizeof name);
    if (snprintf(path, sizeof path, "/proc/self/fd/%d/%s.sock", dfd, name) >= (int)sizeof path)
        return -1;
    int s = keeper_connect(path);
    if (s < 0) {
        int rc = keeper_start(dfd, name);
        if (rc != 0 && rc != 3)
            return -1;
        double until = mono() + 2.0;    /* 3: another run is starting the keeper of this name */
        while ((s = keeper_connect(path)) < 0 && mono() < until)
            usleep(2000);
        if (s < 0)
            return -1;
    }
    int img = open(P->squashfs, O_RDONLY | O_CLOEXEC);
    if (img < 0) {
        close(s);
        return -1;
    }
    char req[4200];
    int rl = snprintf(req, sizeof req, "mount\t0\t%s\n", P->squashfuse);
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } ctl;
    struct iovec io = {req, (size_t)rl};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &img, sizeof img);
    ssize_t sent = sendmsg(s, &m, MSG_NOSIGNAL);
    close(img);
    char rep[4096];
    struct iovec rio = {rep, sizeof rep - 1};
    struct msghdr r = {.msg_iov = &rio, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    ssize_t got = sent == rl ? recvmsg(s, &r, MSG_CMSG_CLOEXEC) : -1;
    int fd = -1;
    for (c = got > 0 ? CMSG_FIRSTHDR(&r) : NULL; c; c = CMSG_NXTHDR(&r, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
    rep[got > 0 ? got : 0] = 0;
    if (fd >= 0 && !strcmp(rep, "ok\n") && !(r.msg_flags & MSG_CTRUNC)) {
        *conn = s;
        return fd;
    }
    if (fd >= 0)
        close(fd);
    close(s);
    if (!strcmp(rep, "error\trefused\n"))
        die(125, "image %s could not be mounted: its file %s is corrupt; remove and re-import it", P->ref,
            P->squashfs);
    return -1;
}

int main(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    double started = mono();
    const char *mode = getenv("NAGAYA_STARTER");
    g_debug = mode && !strcmp(mode, "debug");
    if (mode && !strcmp(mode, "off"))
        python_path("NAGAYA_STARTER=off");
    uid_t uid = getuid();
    gid_t gid = getgid();
    if (geteuid() != uid || getegid() != gid)
        die(125, "the nagaya starter must not be installed setuid or setgid");
    if (argc > 2 && !strcmp(argv[1], "submit"))
        submit_fast(argc, argv);                /* submit.c: never returns */
    if (argc < 4 || (strcmp(argv[1], "run") && strcmp(argv[1], "exec")))
        python_path("not a plain run/exec");
    int i = 2;
    const char *gpus = "";
    for (;;) {                  /* run_cmd.parse_args, for the one option replayed: --gpus [all|0,1] */
        if (i < argc && !strcmp(argv[i], "--gpus")) {
            i++;
            gpus = "all";
            if (i < argc && (!strcmp(argv[i], "all") || is_index_list(argv[i])))
                gpus = argv[i++];
        } else if (i < argc && starts(argv[i], "--gpus=")) {
            gpus = argv[i++] + 7;
        } else {
            break;
        }
    }
    if (i < argc && !strcmp(argv[i], "--"))
        i++;
    if (i + 1 >= argc || argv[i][0] == '-' || !argv[i][0])
        python_path("options, or no command");
    const char *image = argv[i];
    int is_exec = !strcmp(argv[1], "exec");
    size_t il = strlen(image);
    struct stat ist;
    if ((strchr(image, '/') || (il > 4 && !strcmp(image + il - 4, ".nsq"))) && stat(image, &ist) == 0)
        python_path("IMAGE may be a single-file image");
    for (char **p = environ; *p; p++)       /* the rest of NAGAYA_<SECTION>_*: once the plan says which */
        if (starts(*p, "NAGAYA_SITE_CONFIG=") || starts(*p, "NAGAYA_STARTER_PLAN="))
            python_path("a NAGAYA_ variable (the config reads them) in the environment");
    const char *home = getenv("HOME");
    if (!home || home[0] != '/')
        python_path("no $HOME");
    const char *xdg = getenv("XDG_CACHE_HOME");
    char plan_dir[4096];
    if (xdg && *xdg)
        snprintf(plan_dir, sizeof plan_dir, "%s/nagaya/starter", xdg);
    else
        snprintf(plan_dir, sizeof plan_dir, "%s/.cache/nagaya/starter", home);

    /* the plan: the user's own private file, in a directory only they (and root) can change */
    int dfd = open_dir_safe(plan_dir, uid, 0);
    struct stat st;
    if (dfd < 0 || fstat(dfd, &st) || st.st_uid != uid || (st.st_mode & 077))
        replan("no private plan directory");   /* Python makes it, if it may: safefs's rules again */
    struct utsname un;
    uname(&un);
    char pname[64];
    snprintf(pname, sizeof pname, "%016llx.plan", (unsigned long long)fnv1a(image, un.nodename, gpus));
    int pfd = openat(dfd, pname, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (pfd < 0)
        replan("no plan for this image yet");
    if (fstat(pfd, &st) || !S_ISREG(st.st_mode) || st.st_uid != uid || st.st_nlink != 1 || (st.st_mode & 022) ||
        st.st_size <= 0 || st.st_size > PLAN_MAX)
        replan("the plan file is not the user's own private regular file");
    char *text = malloc((size_t)st.st_size + 1);
    ssize_t got = 0, n;
    while (got < st.st_size && (n = read(pfd, text + got, (size_t)(st.st_size - got))) > 0)
        got += n;
    close(pfd);
    if (got != st.st_size)
        replan("short read of the plan");
    text[got] = 0;
    const char *why = NULL;
    P = load_plan(text, &why);
    if (!P)
        replan(why);
    mode_t um = umask(0);
    umask(um);
    if (strcmp(P->ref, image) || strcmp(P->gpus, gpus) || strcmp(P->node, un.nodename) || P->uid != uid || P->gid != gid ||
        strcmp(P->home, home) || P->umask_v != (long)um || !groups_match(P->groups, gid))
        replan("the plan is for another image, node, identity or umask");
    if (!P->envprefix.n)
        replan("incomplete plan");
    for (char **p = environ; *p; p++)
        for (size_t k = 0; k < P->envprefix.n; k++)
            if (starts(*p, P->envprefix.v[k]))
                python_path("a NAGAYA_ variable (the config reads them) in the environment");
    if (P->unpack_threads > 0) {
        cpu_set_t cs;
        if (sched_getaffinity(0, sizeof cs, &cs) || CPU_COUNT(&cs) >= P->unpack_threads)
            python_path("a many-CPU job: the image runs unpacked");
    }
    if (access("/dev/fuse", R_OK | W_OK) || access(P->squashfuse, X_OK))
        python_path("FUSE is not usable");
    for (size_t k = 0; k < P->nupper; k++)
        if (P->upper[k].kind == 'h' && !is_regular(P->upper[k].data))
            replan("a host file the plan copies is gone");
    for (size_t k = 0; k < P->hostabsent.n; k++)
        if (is_regular(P->hostabsent.v[k]))
            replan("a host file the plan lacks appeared");

    /* where the container starts: $HOME or /tmp (bound), or a system directory resolved in the image */
    char host_cwd[8192];
    if (!getcwd(host_cwd, sizeof host_cwd))
        python_path("no current directory");
    int system = 0;
    for (int k = 0; SYSTEM_DIRS[k]; k++)
        system |= !strcmp(host_cwd, SYSTEM_DIRS[k]);
    for (int k = 0; SYSTEM_TREES[k]; k++)
        system |= starts(host_cwd, SYSTEM_TREES[k]);
    int bound = 0;
    for (size_t k = 0; k < P->viewdst.n; k++)
        bound |= !strcmp(P->viewkind.v[k], "base") && under(host_cwd, P->viewdst.v[k]);
    if (!system && !bound)
        python_path("the current directory needs a bind of its own");

    struct strv cargv = {0};
    if (!is_exec)
        for (size_t k = 0; k < P->entry.n; k++)
            sv_push(&cargv, P->entry.v[k]);
    for (int k = i + 1; k < argc; k++)
        sv_push(&cargv, argv[k]);

    /* the image, kept mounted by the user's keeper (launcher._keeper_mount), asked for in the host's namespaces */
    int kconn = -1, kept = -1;
    if (P->keeper > 0)
        kept = keeper_mount(dfd, un.nodename, &kconn);
    close(dfd);
    (void)kconn;                /* open (close-on-exec) until this supervisor exits: the keeper counts it */

    /* host-side work that needs the host's view of owners (launcher: before unsharing) */
    int lock_fd = open(P->lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd >= 0)
        flock(lock_fd, LOCK_SH);
    utime(P->touch, NULL);
    int spool_fd = P->audit_site[0] ? open_dir_safe(P->audit_site, (uid_t)-1, 1) : -1;
    int own = !strcmp(P->staging_kind, "own");
    if (own)
        mkdir(P->staging, 0700);
    int sfd = open_dir_safe(P->staging, own ? uid : (uid_t)-1, 0);
    if (sfd < 0 || fstat(sfd, &st) || (own && st.st_uid != uid))
        replan("the staging directory is not usable");
    dev_t stage_dev = st.st_dev;
    ino_t stage_ino = st.st_ino;
    close(sfd);
    char job_name[1024];
    int job_dfd = -1;
    if (job_record_name(job_name, sizeof job_name))
        job_dfd = job_record_dir();       /* checked before unsharing, where owners can be told apart */
    if (g_debug)
        fprintf(stderr, "nagaya-starter: fast path\n");

    signal(SIGPIPE, SIG_IGN);       /* as Python does: a gone backend is an error to report, not a silent */
    signal(SIGXFSZ, SIG_IGN);       /* death (and squashfuse inherits them as it did from Python) */
    sigset_t block;
    sigemptyset(&block);
    for (size_t k = 0; k < sizeof FORWARD / sizeof *FORWARD; k++)
        sigaddset(&block, FORWARD[k]);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, NULL);
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS | (P->pidns ? CLONE_NEWPID : 0))) {
        sigprocmask(SIG_UNBLOCK, &block, NULL);
        python_path("unshare failed");      /* nothing changed yet: Python says why */
    }
    char map[64];
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
    write_file("/proc/self/gid_map", map);
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL))
        die(125, "container setup failed: %s", strerror(errno));
    /* on the directory checked before unsharing (same device and inode), through an fd of this namespace */
    sfd = open(P->staging, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    char fdpath[64];
    snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", sfd);
    if (sfd < 0 || fstat(sfd, &st) || st.st_dev != stage_dev || st.st_ino != stage_ino ||
        mount("tmpfs", fdpath, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700"))
        die(125, "no staging directory could be mounted");
    close(sfd);
    const char *stage = P->staging;
    char lower[4096], upper[4096], work[4096], root[4096], gen[4096];
    snprintf(lower, sizeof lower, "%s/lower", stage);
    snprintf(upper, sizeof upper, "%s/upper", stage);
    snprintf(work, sizeof work, "%s/work", stage);
    snprintf(root, sizeof root, "%s/root", stage);
    snprintf(gen, sizeof gen, "%s/gen", stage);
    const char *dirs[] = {lower, upper, work, root, gen};
    for (int k = 0; k < 5; k++)
        if (mkdir(dirs[k], 0755))
            die(125, "container setup failed: %s", strerror(errno));
    ROOT = root;
    int fusefd = -1;
    if (kept >= 0) {
        /* refused (an LSM, an old kernel): the run mounts the image itself, as without a keeper */
        if (syscall(SYS_move_mount, kept, "", AT_FDCWD, lower, MOVE_MOUNT_F_EMPTY_PATH))
            kept = -2;
        else
            close(kept);
    }
    if (kept < 0) {
        fusefd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        if (fusefd < 0)
            die(125, "/dev/fuse cannot be opened (%s)", strerror(errno));
        char opts[256];
        snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_permissions", fusefd,
                 (unsigned)uid, (unsigned)gid);      /* (launcher.py: as the overlay checks modes) */
        if (mount("nagaya", lower, "fuse.squashfuse", MS_NOSUID | MS_NODEV | MS_RDONLY, opts))
            die(125, "container setup failed: %s", strerror(errno));
    }
    int bp[2], sp[2];
    if (pipe2(bp, O_CLOEXEC) || pipe2(sp, O_CLOEXEC))
        die(125, "container setup failed: %s", strerror(errno));
    pid_t bpid = fork();
    if (bpid < 0)
        die(125, "container setup failed: %s", strerror(errno));
    if (bpid == 0) {
        /* pid 1 of the container's pid namespace: starts squashfuse (unless kept), then becomes bwrap */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(bp[1]);
        close(sp[0]);
        if (fusefd >= 0) {
            fcntl(fusefd, F_SETFD, 0);
            char dev[64];
            snprintf(dev, sizeof dev, "/dev/fd/%d", fusefd);
            char *base = strrchr(P->squashfuse, '/');
            char *sargv[] = {base ? base + 1 : P->squashfuse, "-f", P->squashfs, dev, NULL};
            posix_spawn_file_actions_t fa;
            posix_spawn_file_actions_init(&fa);
            posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0);
            posix_spawn_file_actions_adddup2(&fa, 0, 1);
            /* its stderr too: a file it refuses is reported once, by the first request below (one line) */
            posix_spawn_file_actions_adddup2(&fa, 0, 2);
            pid_t sq;
            int rc = posix_spawn(&sq, P->squashfuse, &fa, NULL, sargv, environ);
            if (rc)
                die(125, "cannot start squashfuse: %s", strerror(rc));
            close(fusefd);
        }
        /* the request: "N\n" then N NUL-terminated argv strings, then "M\n" and M "K=V" strings */
        struct buf req = {0};
        char tmp[65536];
        ssize_t rn;
        while ((rn = read(bp[0], tmp, sizeof tmp)) > 0)
            b_put(&req, tmp, (size_t)rn);
        if (!req.n)
            _exit(125);
        char *cur = req.s, *end = req.s + req.n;
        struct strv rargv = {0}, renv = {0};
        struct strv *lists[2] = {&rargv, &renv};
        for (int l = 0; l < 2; l++) {
            char *nl = memchr(cur, '\n', (size_t)(end - cur));
            if (!nl)
                _exit(125);
            size_t cnt = strtoul(cur, NULL, 10);
            cur = nl + 1;
            for (size_t k = 0; k < cnt; k++) {
                char *z = memchr(cur, 0, (size_t)(end - cur));
                if (!z)
                    _exit(125);
                sv_push(lists[l], cur);
                cur = z + 1;
            }
        }
        if (!renv.v)
            sv_push(&renv, NULL), renv.n = 0;
        /* a mount namespace of its own, with /proc of the container's pid namespace over /proc */
        if (unshare(CLONE_NEWNS) || mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
            die(125, "cannot start the container: %s", strerror(errno));
        fcntl(sp[1], F_SETFD, 0);
        signal(SIGINT, SIG_DFL);        /* as the Python launcher leaves them for bwrap */
        signal(SIGPIPE, SIG_DFL);
        signal(SIGXFSZ, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(rargv.v[0], rargv.v, renv.v);
        die(125, "cannot start the container: %s", strerror(errno));
    }
    if (fusefd >= 0)
        close(fusefd);
    close(bp[0]);
    close(sp[1]);

    struct env env = {0};
    coerce_c_locale();
    build_env(&env);
    for (size_t k = 0; k < P->nupper; k++) {
        struct upper_entry *u = &P->upper[k];
        char *path = cat2(upper, u->path);
        if (u->kind == 'd') {
            if (mkdir(path, u->mode) && errno != EEXIST)
                die(125, "container setup failed: %s: %s", u->path, strerror(errno));
            chmod(path, u->mode);
            continue;
        }
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, u->mode);
        if (fd < 0)
            die(125, "container setup failed: %s: %s", u->path, strerror(errno));
        if (u->kind == 'f') {
            if (write(fd, u->data, strlen(u->data)) < 0)
                die(125, "container setup failed: %s", strerror(errno));
        } else {
            int hf = open(u->data, O_RDONLY | O_CLOEXEC);
            char *hb = malloc(1 << 20);
            ssize_t hn = hf >= 0 ? read(hf, hb, 1 << 20) : -1;
            if (hn > 0 && write(fd, hb, (size_t)hn) < 0)
                die(125, "container setup failed: %s", strerror(errno));
            if (hf >= 0)
                close(hf);
            free(hb);
        }
        fchmod(fd, u->mode);
        close(fd);
        free(path);
    }
    stage_gpu_dir(stage);
    /* the work above overlapped squashfuse's start; now its first request */
    DIR *d = opendir(lower);     /* the first request: fails at once if squashfuse refused the file */
    if (!d || (errno = 0, readdir(d) == NULL && errno))
        die(125, "image %s could not be mounted: its file %s is corrupt; remove and re-import it", P->ref,
            P->squashfs);
    closedir(d);
    char ovl[16384];
    snprintf(ovl, sizeof ovl, "lowerdir=%s,upperdir=%s,workdir=%s,userxattr", lower, upper, work);
    if (mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV, ovl))
        die(125, "cannot mount the container's overlay (%s); the kernel must allow overlayfs in user namespaces "
                 "(Linux >= 5.11)", strerror(errno));
    /* the image's directories the upper layer leaves alone, bound past the overlay (launcher.py's
       _bypass_overlay): each must still be a directory, not a link, on both sides */
    for (size_t k = 0; k < P->bypass.n; k++) {
        char src[8192], dst[8192];
        struct stat a, b;
        errno = 0;
        snprintf(src, sizeof src, "%s/%s", lower, P->bypass.v[k]);
        snprintf(dst, sizeof dst, "%s/%s", root, P->bypass.v[k]);
        if (lstat(src, &a) || lstat(dst, &b) || !S_ISDIR(a.st_mode) || !S_ISDIR(b.st_mode) ||
            mount(src, dst, NULL, MS_BIND, NULL))
            die(125, "container setup failed: /%s: %s", P->bypass.v[k], strerror(errno ? errno : ENOTDIR));
    }
    char resolved[8192];
    const char *cwd = resolve(host_cwd, resolved, sizeof resolved) ? host_cwd : "/";
    const char *reason = find_command(cargv.v[0], env_get(&env, "PATH"), cwd);
    if (reason) {
        close(bp[1]);
        waitpid(bpid, NULL, 0);
        if (!strcmp(reason, "not found"))
            die(127, "%s: command not found in image %s", cargv.v[0], P->ref);
        die(126, "%s: %s", cargv.v[0], reason);
    }
    char fdnum[16];
    snprintf(fdnum, sizeof fdnum, "%d", sp[1]);
    struct strv bargv = {0};
    for (size_t k = 0; k < P->tmpl.n; k++)
        sv_push(&bargv, P->tmpl.v[k]);
    for (size_t k = 0; k < bargv.n; k++) {
        if (!strcmp(bargv.v[k], "\001FD"))
            bargv.v[k] = fdnum;
        else if (!strcmp(bargv.v[k], "\001CWD"))
            bargv.v[k] = (char *)cwd;
    }
    for (size_t k = 0; k < cargv.n; k++)
        sv_push(&bargv, cargv.v[k]);
    struct buf msg = {0};
    char num[32];
    snprintf(num, sizeof num, "%zu\n", bargv.n);
    b_str(&msg, num);
    for (size_t k = 0; k < bargv.n; k++)
        b_put(&msg, bargv.v[k], strlen(bargv.v[k]) + 1);
    snprintf(num, sizeof num, "%zu\n", env.kv.n);
    b_str(&msg, num);
    for (size_t k = 0; k < env.kv.n; k++)
        b_put(&msg, env.kv.v[k], strlen(env.kv.v[k]) + 1);
    for (size_t off = 0; off < msg.n;) {
        ssize_t w = write(bp[1], msg.s + off, msg.n - off);
        if (w <= 0)
            die(125, "cannot start the container: %s", strerror(errno));
        off += (size_t)w;
    }
    close(bp[1]);
    if (job_dfd >= 0) {
        if (write_job_record(job_dfd, job_name, bpid, cwd, &cargv, &env.kv) == 0) {
            prune_job_records(job_dfd, job_name);
        } else {
            dprintf(2, "nagaya: note: no record for `nagaya job exec`: %s\n", strerror(errno));
            close(job_dfd);
            job_dfd = -1;
        }
    }
    /* read the command's file ahead while bwrap sets up (launcher._prefetch): aligned, block-sized */
    size_t rl = strlen(root);
    if (!strncmp(found_host, root, rl) && found_host[rl] == '/' && fork() == 0) {
        int fd = open(found_host, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && fstat(fd, &st) == 0) {
            off_t endp = st.st_size < (16 << 20) ? st.st_size : (16 << 20);
            for (off_t off = 0; off < endp; off += 128 << 10)
                posix_fadvise(fd, off, 128 << 10, POSIX_FADV_WILLNEED);
        }
        _exit(0);
    }
    int code = supervise(bpid, sp[0]);
    if (job_dfd >= 0)
        unlinkat(job_dfd, job_name, 0);
    if (code < 0)
        die(125, "the container could not be started (bwrap exit %d)", -1 - code);
    audit(&cargv, host_cwd, cwd, code, mono() - started, spool_fd);
    (void)lock_fd;
    return code;
}
