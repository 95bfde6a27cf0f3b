/* `nagaya submit` on Grid Engine and PBS without Python: the replay of a submit plan (sched/submitplan.py).
 *
 * Included by nagaya-starter.c (one translation unit: deploy/install.sh compiles that file alone) after its
 * helpers, which this part uses as the run path does: safefs's rules, the plan's line format, the JSON
 * strings, the audit spool. `nagaya submit [--backend B] --image NAME [--json] [--] CMD...`, with nothing
 * else on the line and every dependency unchanged, submits the job exactly as the Python path would: the
 * same qsub argv and environment, the same wrapper, job record, audit record and output. Anything else, and
 * any doubt, execs the Python CLI (asking it for a fresh plan where one could serve). THREAT_MODEL B27.
 */
#include <poll.h>

#define SUBMIT_FORMAT "nagaya-submit-plan 1"
#define ARG_SCRIPT_MAX 100000                   /* sched/pbs.py: a larger wrapper goes to qsub on stdin */
#define SUBMIT_CMD "@NAGAYA_SUBMIT_CMD@"
#define SUBMIT_NAME "NAGAYASUBMITNAME"
#define SUBMIT_CWD "/NAGAYA_SUBMIT_CWD"

struct splan {
    char *kbackend, *kimage, *node, *name, *home, *groups, *backend, *qsub, *mode, *statedir, *ref, *digest;
    char *image, *audit_file, *audit_site, *script;
    uid_t uid;
    gid_t gid;
    long umask_v, namemax;
    int audit_syslog, ident, ended;
    struct strv setk, setv, args;
};

/* Parse the plan and check every dependency; NULL (with *why) if it must not be used. */
static struct splan *load_submit_plan(char *text, const char **why) {
    static struct splan p;
    char *save = NULL, *f[8];
    char *line = strtok_r(text, "\n", &save);
    if (!line || strcmp(line, SUBMIT_FORMAT)) {
        *why = "submit plan of another format";
        return NULL;
    }
    while ((line = strtok_r(NULL, "\n", &save))) {
        int n = fields(line, f, 8);
        const char *k = f[0];
#define SNEED(c) if (n < (c)) { *why = "malformed submit plan"; return NULL; }
        if (!strcmp(k, "key")) { SNEED(4) p.kbackend = f[1]; p.kimage = f[2]; p.node = f[3]; }
        else if (!strcmp(k, "ident")) {
            SNEED(6) p.uid = (uid_t)strtoul(f[1], NULL, 10); p.gid = (gid_t)strtoul(f[2], NULL, 10);
            p.groups = f[3]; p.name = f[4]; p.home = f[5]; p.ident = 1;
        }
        else if (!strcmp(k, "umask")) { SNEED(2) p.umask_v = strtol(f[1], NULL, 10); }
        else if (!strcmp(k, "backend")) { SNEED(2) p.backend = f[1]; }
        else if (!strcmp(k, "qsub")) { SNEED(2) p.qsub = f[1]; }
        else if (!strcmp(k, "mode")) { SNEED(2) p.mode = f[1]; }
        else if (!strcmp(k, "namemax")) { SNEED(2) p.namemax = strtol(f[1], NULL, 10); }
        else if (!strcmp(k, "statedir")) { SNEED(2) p.statedir = f[1]; }
        else if (!strcmp(k, "ref")) { SNEED(2) p.ref = f[1]; }
        else if (!strcmp(k, "digest")) { SNEED(2) p.digest = f[1]; }
        else if (!strcmp(k, "image")) { SNEED(2) p.image = f[1]; }
        else if (!strcmp(k, "audit_file")) { SNEED(2) p.audit_file = f[1]; }
        else if (!strcmp(k, "audit_site")) { SNEED(2) p.audit_site = f[1]; }
        else if (!strcmp(k, "audit_syslog")) { SNEED(2) p.audit_syslog = atoi(f[1]); }
        else if (!strcmp(k, "setenv")) { SNEED(3) sv_push(&p.setk, f[1]); sv_push(&p.setv, f[2]); }
        else if (!strcmp(k, "arg")) { SNEED(2) sv_push(&p.args, f[1]); }
        else if (!strcmp(k, "script")) { SNEED(2) p.script = f[1]; }
        else if (!strcmp(k, "envdep")) {
            SNEED(3) const char *v = getenv(f[1]);
            if (!v || strcmp(v, f[2])) { *why = "a variable the submit plan depends on changed"; return NULL; }
        } else if (!strcmp(k, "envunset")) {
            SNEED(2) if (getenv(f[1])) { *why = "a variable the submit plan depends on is set"; return NULL; }
        } else if (!strcmp(k, "dep")) {
            SNEED(6) if (!same_stat(f[1], f + 2)) { *why = "a file the submit plan depends on changed"; return NULL; }
        } else if (!strcmp(k, "absent")) {
            struct stat st;
            SNEED(2) if (lstat(f[1], &st) == 0 || errno != ENOENT) {
                *why = "a file the submit plan depends on appeared";
                return NULL;
            }
        } else if (!strcmp(k, "end")) {
            p.ended = 1;
        } else {
            *why = "unknown submit plan entry";
            return NULL;
        }
#undef SNEED
    }
    if (!p.ended || !p.ident || !p.kbackend || !p.backend || !p.qsub || !p.mode || !p.statedir || !p.ref ||
        !p.digest || !p.image || !p.audit_file || !p.audit_site || !p.script || !p.args.n) {
        *why = "incomplete submit plan";
        return NULL;
    }
    return &p;
}

/* shlex.quote */
static void b_shquote(struct buf *b, const char *s) {
    if (!*s) {
        b_str(b, "''");
        return;
    }
    int safe = 1;
    for (const char *c = s; *c && safe; c++)
        safe = isalnum((unsigned char)*c) || strchr("_@%+=:,./-", *c);
    if (safe) {
        b_str(b, s);
        return;
    }
    b_str(b, "'");
    for (const char *c = s; *c; c++)
        b_str(b, *c == '\'' ? "'\"'\"'" : (char[]){*c, 0});
    b_str(b, "'");
}

static int printable(const char *s) {
    for (; *s; s++)
        if (*s < ' ' || *s > '~')
            return 0;
    return 1;
}

/* str.strip()'s whitespace, in ASCII */
static int py_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static char *py_strip(char *s) {
    while (*s && py_space(*s))
        s++;
    size_t n = strlen(s);
    while (n && py_space(s[n - 1]))
        s[--n] = 0;
    return s;
}

/* Run qsub: its stdout and stderr captured, `input` (if any) on its stdin, as subprocess.run(timeout=60). */
static int run_qsub(char **av, const char *input, struct buf *out, struct buf *err) {
    int po[2], pe[2], pi[2] = {-1, -1};
    if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) || (input && pipe2(pi, O_CLOEXEC)))
        die(1, "cannot run %s: %s", av[0], strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        die(1, "cannot run %s: %s", av[0], strerror(errno));
    if (pid == 0) {
        if (input)
            dup2(pi[0], 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        execv(av[0], av);
        dprintf(2, "%s: %s\n", av[0], strerror(errno));
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    if (input)
        close(pi[0]);
    size_t off = 0, len = input ? strlen(input) : 0;
    if (input && !len) {
        close(pi[1]);
        pi[1] = -1;
    }
    signal(SIGPIPE, SIG_IGN);
    double deadline = mono() + 60;
    int open_o = 1, open_e = 1;
    while (open_o || open_e || (input && pi[1] >= 0)) {
        struct pollfd fds[3];
        int nf = 0, io = -1, ie = -1, ii = -1;
        if (open_o) { fds[nf] = (struct pollfd){.fd = po[0], .events = POLLIN}; io = nf++; }
        if (open_e) { fds[nf] = (struct pollfd){.fd = pe[0], .events = POLLIN}; ie = nf++; }
        if (input && pi[1] >= 0) { fds[nf] = (struct pollfd){.fd = pi[1], .events = POLLOUT}; ii = nf++; }
        int left = (int)((deadline - mono()) * 1000);
        if (left <= 0 || poll(fds, (nfds_t)nf, left) == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            die(1, "qsub: no answer in 60 s");
        }
        char chunk[65536];
        for (int k = 0; k < 2; k++) {
            int at = k ? ie : io;
            if (at < 0 || !(fds[at].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t r = read(fds[at].fd, chunk, sizeof chunk);
            if (r > 0)
                b_put(k ? err : out, chunk, (size_t)r);
            else if (r == 0 || errno != EINTR)
                *(k ? &open_e : &open_o) = 0;
        }
        if (ii >= 0 && fds[ii].revents) {
            ssize_t w = (fds[ii].revents & POLLOUT) ? write(pi[1], input + off, len - off) : -1;
            if (w > 0)
                off += (size_t)w;
            if (w < 0 || off >= len) {
                close(pi[1]);
                pi[1] = -1;
            }
        }
    }
    close(po[0]);
    close(pe[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    signal(SIGPIPE, SIG_DFL);
    if (!out->s)
        b_str(out, "");
    if (!err->s)
        b_str(err, "");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* The last of str.splitlines() (ASCII line boundaries) of an already stripped text. */
static char *last_line(char *s) {
    char *last = s;
    for (char *c = s; *c; c++)
        if (*c == '\n' || *c == '\r' || *c == '\v' || *c == '\f' || (*c >= 0x1c && *c <= 0x1e))
            last = c + 1;
    return last;
}

/* sched/pbs.py KEY: (\d+)(?:\[(\d*)\])?(?:\..*)?, fullmatch; the digits, or NULL */
static char *pbs_key(char *s) {
    char *c = s;
    while (*c >= '0' && *c <= '9')
        c++;
    if (c == s)
        return NULL;
    char *end = c;
    if (*c == '[') {
        c++;
        while (*c >= '0' && *c <= '9')
            c++;
        if (*c != ']')
            return NULL;
        c++;
    }
    if (*c && *c != '.')
        return NULL;
    *end = 0;
    return s;
}

static void submit_audit(struct splan *p, char **cmd, int ncmd, const char *cwd, const char *job) {
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
    /* audit.AuditEvent.to_json: json.dumps(separators=(",", ":"), sort_keys=True) */
    struct buf b = {0};
    b_str(&b, "{\"action\":\"submit\",\"command\":[");
    for (int i = 0; i < ncmd; i++) {
        if (i)
            b_str(&b, ",");
        b_json(&b, cmd[i]);
    }
    b_str(&b, "],\"cwd\":");
    b_json(&b, cwd);
    b_str(&b, ",\"details\":{\"after\":\"\",\"array\":\"\",\"backend\":");
    b_json(&b, p->backend);
    b_str(&b, ",\"cpus\":1,\"gpus\":\"\",\"job\":");
    b_json(&b, job);
    b_str(&b, ",\"mem\":\"\",\"nodes\":1,\"ntasks\":1,\"time_limit\":0},\"digest\":");
    b_json(&b, p->digest);
    b_str(&b, ",\"duration_s\":null,\"exit_code\":null,\"host\":");
    b_json(&b, u.nodename);
    b_str(&b, ",\"id\":\"");
    b_str(&b, id);
    b_str(&b, "\",\"image\":");
    b_json(&b, p->image);
    b_str(&b, ",\"time\":\"");
    b_str(&b, when);
    snprintf(num, sizeof num, "\",\"uid\":%u,\"user\":", (unsigned)p->uid);
    b_str(&b, num);
    b_json(&b, p->name);
    b_str(&b, "}");
    size_t line_len = b.n;
    b_str(&b, "\n");
    /* audit._append: the user's log, its directory made as os.makedirs makes it */
    char *dir = xstrdup(p->audit_file);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        mkdirs(dir);
    }
    int fd = open(p->audit_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, b.s, b.n) < 0) { /* auditing never makes the user's command fail */ }
        close(fd);
    }
    int spool_fd = p->audit_site[0] ? open_dir_safe(p->audit_site, (uid_t)-1, 1) : -1;
    if (spool_fd >= 0) {        /* safefs.append_own: USER.jsonl, USER.1.jsonl, then a fresh unguessable name */
        char names[3][512];
        snprintf(names[0], sizeof names[0], "%s.jsonl", p->name);
        snprintf(names[1], sizeof names[1], "%s.1.jsonl", p->name);
        unsigned char r8[8];
        rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (rfd < 0 || read(rfd, r8, 8) != 8)
            memset(r8, 0x5a, sizeof r8);
        if (rfd >= 0)
            close(rfd);
        char hex[17];
        for (int i = 0; i < 8; i++)
            sprintf(hex + 2 * i, "%02x", r8[i]);
        snprintf(names[2], sizeof names[2], "%s.%s.jsonl", p->name, hex);
        for (int i = 0; i < 3; i++) {
            fd = open_file_checked(spool_fd, names[i], O_WRONLY | O_APPEND, 0600, getuid());
            if (fd < 0)
                continue;
            ssize_t w = write(fd, b.s, b.n);
            close(fd);
            if (w >= 0)
                break;
        }
        close(spool_fd);
    }
    if (p->audit_syslog) {
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

/* Never returns: the job submitted and reported, or the Python CLI exec'd. */
static void submit_fast(int argc, char **argv) {
    const char *backend = "", *image = NULL;
    int json = 0, i = 2;
    for (; i < argc; i++) {     /* cli/submit_fast.parse, for the options replayed */
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        }
        if (a[0] != '-' || !strcmp(a, "-"))
            break;
        if (!strcmp(a, "--json"))
            json = 1;
        else if ((!strcmp(a, "--backend") || !strcmp(a, "--image") || !strcmp(a, "-i")) && i + 1 < argc && argv[i + 1][0])
            *(a[2] == 'b' ? &backend : &image) = argv[++i];
        else if (starts(a, "--backend=") && a[10])
            backend = a + 10;
        else if (starts(a, "--image=") && a[8])
            image = a + 8;
        else
            python_path("submit: an option the starter does not replay");
    }
    char **cmd = argv + i;
    int ncmd = argc - i;
    if (!image || ncmd < 1)
        python_path("submit: no image or no command");
    for (char **p = environ; *p; p++)
        if (starts(*p, "NAGAYA_") && !starts(*p, "NAGAYA_STARTER="))
            python_path("submit: a NAGAYA_ variable in the environment");
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd) || !printable(cwd) || !printable(image) || !printable(backend))
        python_path("submit: a working directory or image name the starter does not replay");
    for (int k = 0; k < ncmd; k++)
        if (!printable(cmd[k]))
            python_path("submit: a command the starter does not replay");
    struct stat st;
    if (stat(cmd[0], &st) == 0 || (errno != ENOENT && errno != ENOTDIR))
        python_path("submit: the command may be a batch script");
    uid_t uid = getuid();
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
    if (dfd < 0 || fstat(dfd, &st) || st.st_uid != uid || (st.st_mode & 077))
        replan("no private plan directory");
    struct utsname un;
    uname(&un);
    uint64_t h = 0xcbf29ce484222325ULL;
    const char *key[] = {"submit", backend, image, un.nodename};
    for (int k = 0; k < 4; k++) {
        if (k)
            h = (h ^ 0) * 0x100000001b3ULL;
        for (const unsigned char *s = (const unsigned char *)key[k]; *s; s++)
            h = (h ^ *s) * 0x100000001b3ULL;
    }
    char pname[64];
    snprintf(pname, sizeof pname, "%016llx.submit", (unsigned long long)h);
    int pfd = openat(dfd, pname, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    close(dfd);
    if (pfd < 0)
        replan("no submit plan for this image yet");
    if (fstat(pfd, &st) || !S_ISREG(st.st_mode) || st.st_uid != uid || st.st_nlink != 1 || (st.st_mode & 022) ||
        st.st_size <= 0 || st.st_size > PLAN_MAX)
        replan("the submit plan is not the user's own private regular file");
    char *text = malloc((size_t)st.st_size + 1);
    ssize_t got = 0, n;
    while (text && got < st.st_size && (n = read(pfd, text + got, (size_t)(st.st_size - got))) > 0)
        got += n;
    close(pfd);
    if (!text || got != st.st_size)
        replan("short read of the submit plan");
    text[got] = 0;
    const char *why = NULL;
    struct splan *p = load_submit_plan(text, &why);
    if (!p)
        replan(why);
    mode_t um = umask(0);
    umask(um);
    if (strcmp(p->kbackend, backend) || strcmp(p->kimage, image) || strcmp(p->node, un.nodename) || p->uid != uid ||
        p->gid != getgid() || strcmp(p->home, home) || p->umask_v != (long)um || !groups_match(p->groups, getgid()))
        replan("the submit plan is for another backend, image, node, identity or umask");

    /* the job's name: batchwrap.job_name(Path(CMD).name) */
    char *base = xstrdup(cmd[0]);
    size_t bl = strlen(base);
    while (bl > 1 && base[bl - 1] == '/')
        base[--bl] = 0;
    char *slash = strrchr(base, '/');
    char *nm = slash ? slash + 1 : base;
    if (!*nm || !strcmp(nm, "."))
        python_path("submit: a command whose name pathlib normalises");
    struct buf jn = {0};
    if (*nm >= '0' && *nm <= '9')
        b_str(&jn, "j");
    for (char *c = nm; *c; c++)
        b_put(&jn, strchr("/:@\\*? ", *c) ? "_" : c, 1);
    if (p->namemax > 0 && jn.n > (size_t)p->namemax)
        jn.s[jn.n = (size_t)p->namemax] = 0;
    /* the wrapper: the template with shlex.join's command */
    struct buf q = {0}, script = {0};
    for (int k = 0; k < ncmd; k++) {
        if (k)
            b_str(&q, " ");
        b_shquote(&q, cmd[k]);
    }
    char *at = strstr(p->script, SUBMIT_CMD);
    if (!at || strstr(at + 1, SUBMIT_CMD))
        replan("malformed submit plan");
    b_put(&script, p->script, (size_t)(at - p->script));
    b_str(&script, q.s);
    b_str(&script, at + strlen(SUBMIT_CMD));
    int argv_mode = !strcmp(p->mode, "argv");
    if (argv_mode && script.n > ARG_SCRIPT_MAX)
        python_path("submit: a wrapper too long for qsub's command line");
    /* the state directory (BatchBackend._state_dir): the user's own, private; else Python makes or refuses it */
    int sfd = open_dir_safe(p->statedir, uid, 0);
    if (sfd < 0 || fstat(sfd, &st) || st.st_uid != uid || (st.st_mode & 077))
        python_path("submit: the state directory is not ready");
    if (access(p->qsub, X_OK))
        python_path("submit: qsub is not there");
    struct strv av = {0};
    sv_push(&av, p->qsub);
    for (size_t k = 0; k < p->args.n; k++)
        sv_push(&av, !strcmp(p->args.v[k], SUBMIT_NAME) ? jn.s : !strcmp(p->args.v[k], SUBMIT_CWD) ? cwd : p->args.v[k]);
    if (argv_mode) {
        char *tail[] = {"--", "/bin/bash", "-c", script.s, "nagaya-job"};
        for (int k = 0; k < 5; k++)
            sv_push(&av, tail[k]);
    }
    if (g_debug)
        fprintf(stderr, "nagaya-starter: submit fast path\n");
    coerce_c_locale();          /* the environment Python's qsub would get (PEP 538), and the scheduler's own */
    for (size_t k = 0; k < p->setk.n; k++)
        setenv(p->setk.v[k], p->setv.v[k], 1);

    struct buf out = {0}, err = {0};
    int rc = run_qsub(av.v, argv_mode ? NULL : script.s, &out, &err);
    if (rc != 0) {
        char *e = py_strip(err.s);
        die(1, "qsub: %s", *e ? e : py_strip(out.s));
    }
    char *o = py_strip(out.s);
    if (!*o)
        die(1, "qsub: no answer");
    char *job = last_line(o);
    if (!strcmp(p->backend, "pbs")) {
        if (!pbs_key(job))
            die(1, "qsub: unexpected answer '%s'", o);
    } else {
        char *dot = strchr(job, '.');
        if (dot)
            *dot = 0;
    }
    /* the job's record (BatchBackend._save_record): json.dumps, written aside and renamed */
    time_t now = time(NULL);
    struct tm tm;
    tzset();
    localtime_r(&now, &tm);
    char when[64];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    struct buf rec = {0};
    b_str(&rec, "{\"id\": ");
    b_json(&rec, job);
    b_str(&rec, ", \"name\": ");
    b_json(&rec, jn.s);
    b_str(&rec, ", \"digest\": ");
    b_json(&rec, p->digest);
    b_str(&rec, ", \"image\": ");
    b_json(&rec, p->ref);
    b_str(&rec, ", \"command\": [");
    for (int k = 0; k < ncmd; k++) {
        if (k)
            b_str(&rec, ", ");
        b_json(&rec, cmd[k]);
    }
    b_str(&rec, "], \"time_limit\": 0, \"cwd\": ");
    b_json(&rec, cwd);
    b_str(&rec, ", \"array\": \"\", \"after\": \"\", \"nodes\": 1, \"submit_time\": ");
    b_json(&rec, when);
    b_str(&rec, "}\n");
    char tmpn[512], fin[512];
    snprintf(tmpn, sizeof tmpn, ".%s.job.tmp", job);
    snprintf(fin, sizeof fin, "%s.job", job);
    int rfd = strchr(job, '/') ? -1 : openat(sfd, tmpn, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (rfd < 0 || write(rfd, rec.s, rec.n) != (ssize_t)rec.n || close(rfd) || renameat(sfd, tmpn, sfd, fin))
        die(1, "cannot write the record of job %s in %s: %s", job, p->statedir, strerror(errno));
    close(sfd);
    submit_audit(p, cmd, ncmd, cwd, job);
    struct buf res = {0};
    if (json) {     /* json.dumps(out, indent=2) */
        b_str(&res, "{\n  \"id\": ");
        b_json(&res, job);
        b_str(&res, ",\n  \"backend\": ");
        b_json(&res, p->backend);
        b_str(&res, ",\n  \"image\": ");
        b_json(&res, p->ref);
        b_str(&res, ",\n  \"digest\": ");
        b_json(&res, p->digest);
        b_str(&res, "\n}\n");
    } else {
        b_str(&res, "Submitted batch job ");
        b_str(&res, job);
        b_str(&res, "\n");
    }
    if (write(1, res.s, res.n) != (ssize_t)res.n)
        _exit(120);
    _exit(0);
}
