/* nagaya-squashfs: a read-only FUSE server for nagaya's squashfs images.
 *
 * Replaces squashfuse_ll (Debian 12: 0.1.105), which serves one request at a time and lets the kernel cache
 * little. Here the session loop is multi-threaded and every worker thread has its own decompressor and
 * readers (libsquashfs's readers keep state and are not thread-safe), so reads run in parallel; the image never
 * changes while it is mounted, so entries, attributes, pages, symlinks and directory listings are cached by
 * the kernel for good (long timeouts, keep_cache, cache_readdir, readdirplus). Open and opendir are left to the
 * kernel (no-open, no-opendir: no OPEN/RELEASE/OPENDIR/RELEASEDIR round trips); reads and listings name only the
 * inode, so block lists and listings are kept per inode (see the per-inode caches). The mount is read-only.
 *
 * File data: decompressed blocks and fragment blocks go to one cache shared by the threads (the kernel's
 * readahead windows are not block-aligned, so consecutive requests, served by different threads, share
 * blocks: a per-thread single-block cache would decompress most blocks twice). Decompression runs outside
 * the cache's lock; replies point into the cached blocks (fuse_reply_iov), which stay pinned until sent.
 *
 * Command line, as nagaya starts squashfuse_ll:  nagaya-squashfs [-f] [-o offset=N,...] IMAGE MOUNTPOINT
 * (MOUNTPOINT is usually /dev/fd/N: a /dev/fuse fd already mounted by the caller). A missing, corrupt or
 * truncated image is refused before anything is mounted, with one line on stderr and exit status 1. An image
 * whose compressor libsquashfs lacks (lzo) is handed to squashfuse_ll (exec, same arguments).
 *
 * Node ids: the root is FUSE_ROOT_ID; any other inode is its squashfs inode reference + 2 (a reference is
 * block << 16 | offset, well below 2^62), so lookups need no table and forget needs no work. st_ino is the
 * squashfs inode number (hard links share it; squashfuse_ll numbers inodes its own way, stable too).
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <sqfs/block.h>
#include <sqfs/compressor.h>
#include <sqfs/frag_table.h>
#include <sqfs/dir.h>
#include <sqfs/error.h>
#include <sqfs/id_table.h>
#include <sqfs/inode.h>
#include <sqfs/io.h>
#include <sqfs/meta_reader.h>
#include <sqfs/super.h>
#include <sqfs/xattr.h>
#include <sqfs/xattr_reader.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define PROG "nagaya-squashfs"
#define FOREVER (365.0 * 86400.0)       /* entry and attribute timeout: the image never changes */

/* ---- the image file: pread at an offset (single-file images hold the squashfs inside a larger file) ---- */

typedef struct {
    sqfs_file_t base;
    int fd;
    uint64_t offset, size;
} img_file_t;

static int img_read_at(sqfs_file_t *f, sqfs_u64 off, void *buf, size_t size) {
    img_file_t *im = (img_file_t *)f;
    if (off > im->size || size > im->size - off)
        return SQFS_ERROR_OUT_OF_BOUNDS;
    char *p = buf;
    while (size) {
        ssize_t n = pread(im->fd, p, size, (off_t)(im->offset + off));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return SQFS_ERROR_IO;
        p += n, off += (uint64_t)n, size -= (size_t)n;
    }
    return 0;
}
static int img_write_at(sqfs_file_t *f, sqfs_u64 off, const void *buf, size_t size) {
    (void)f, (void)off, (void)buf, (void)size;
    return SQFS_ERROR_UNSUPPORTED;
}
static sqfs_u64 img_get_size(const sqfs_file_t *f) { return ((const img_file_t *)f)->size; }
static int img_truncate(sqfs_file_t *f, sqfs_u64 size) {
    (void)f, (void)size;
    return SQFS_ERROR_UNSUPPORTED;
}
static void img_destroy(sqfs_object_t *o) { (void)o; }    /* static: lives as long as the process */

/* ---- shared, read-only state ---- */

static struct {
    img_file_t file;
    sqfs_super_t super;
    sqfs_id_table_t *ids;
    sqfs_frag_table_t *frags;
    int has_xattrs;
    uint64_t inode_limit, dir_limit;     /* ends of the inode and directory tables */
    pthread_key_t key;
} G;

/* ---- per-thread readers: libsquashfs's readers cache blocks and are not thread-safe ---- */

typedef struct {
    sqfs_compressor_t *cmp;
    sqfs_meta_reader_t *inodes, *dirs;
    sqfs_xattr_reader_t *xattrs;
    sqfs_u8 *raw;                 /* one on-disk block, read before decompressing */
} ctx_t;

static void ctx_free(void *p) {
    ctx_t *c = p;
    if (!c)
        return;
    if (c->xattrs)
        sqfs_destroy(c->xattrs);
    free(c->raw);
    if (c->dirs)
        sqfs_destroy(c->dirs);
    if (c->inodes)
        sqfs_destroy(c->inodes);
    if (c->cmp)
        sqfs_destroy(c->cmp);
    free(c);
}

/* (1.2 spells two of these SFQS_) */
static const char *sqfs_err(int e) {
    switch (e) {
    case SQFS_ERROR_ALLOC: return "out of memory";
    case SQFS_ERROR_IO: return "read error";
    case SQFS_ERROR_COMPRESSOR: return "cannot decompress";
    case SQFS_ERROR_CORRUPTED: return "corrupt";
    case SQFS_ERROR_UNSUPPORTED: return "unsupported";
    case SQFS_ERROR_OVERFLOW: return "corrupt (overflow)";
    case SQFS_ERROR_OUT_OF_BOUNDS: return "truncated or corrupt (read past its end)";
    case SFQS_ERROR_SUPER_MAGIC: return "not a squashfs image";
    case SFQS_ERROR_SUPER_VERSION: return "unsupported squashfs version";
    case SQFS_ERROR_SUPER_BLOCK_SIZE: return "corrupt superblock (block size)";
    default: return "corrupt";
    }
}

/* Creates the calling thread's readers; on failure *err says why (the start-up check reports it). */
static ctx_t *ctx_new(int *err) {
    ctx_t *c = calloc(1, sizeof *c);
    sqfs_compressor_config_t cfg;
    int rc = SQFS_ERROR_ALLOC;
    if (!c)
        goto fail;
    if ((rc = sqfs_compressor_config_init(&cfg, (SQFS_COMPRESSOR)G.super.compression_id, G.super.block_size,
                                          SQFS_COMP_FLAG_UNCOMPRESS)) ||
        (rc = sqfs_compressor_create(&cfg, &c->cmp)))
        goto fail;
    if ((G.super.flags & SQFS_FLAG_COMPRESSOR_OPTIONS) &&
        (rc = c->cmp->read_options(c->cmp, &G.file.base)) && rc != SQFS_ERROR_UNSUPPORTED)
        goto fail;
    rc = SQFS_ERROR_ALLOC;
    c->inodes = sqfs_meta_reader_create(&G.file.base, c->cmp, G.super.inode_table_start, G.inode_limit);
    c->dirs = sqfs_meta_reader_create(&G.file.base, c->cmp, G.super.directory_table_start, G.dir_limit);
    c->raw = malloc(G.super.block_size);
    if (!c->inodes || !c->dirs || !c->raw)
        goto fail;
    if (G.has_xattrs) {
        rc = SQFS_ERROR_ALLOC;
        if (!(c->xattrs = sqfs_xattr_reader_create(0)) ||
            (rc = sqfs_xattr_reader_load(c->xattrs, &G.super, &G.file.base, c->cmp)))
            goto fail;
    }
    return c;
fail:
    if (err)
        *err = rc;
    ctx_free(c);
    return NULL;
}

static ctx_t *first_ctx;            /* made by the start-up check; the first worker thread takes it over */

static ctx_t *ctx(void) {
    ctx_t *c = pthread_getspecific(G.key);
    if (c)
        return c;
    c = __atomic_exchange_n(&first_ctx, NULL, __ATOMIC_ACQ_REL);
    if (c || (c = ctx_new(NULL)))
        pthread_setspecific(G.key, c);
    return c;
}

/* ---- file data: a cache of decompressed blocks shared by the threads ---- */

typedef struct {
    uint64_t loc;                 /* the block's on-disk offset: unique per data or fragment block */
    uint32_t len;                 /* decompressed length */
    uint32_t refs;                /* readers holding it (not evicted while > 0) */
    uint64_t used;                /* LRU tick */
    int valid;
    sqfs_u8 *data;
} blk_t;

static struct {
    pthread_mutex_t lock;
    blk_t *b;
    size_t n;
    uint64_t tick;
    sqfs_u8 **spare;              /* buffers of evicted blocks, for reuse: a fresh 128 KiB malloc is an mmap, */
    size_t nspare;                /* 32 page faults and a TLB shootdown per block read */
} C = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0, NULL, 0};

static sqfs_u8 *buf_new(void) {
    sqfs_u8 *b = NULL;
    pthread_mutex_lock(&C.lock);
    if (C.nspare)
        b = C.spare[--C.nspare];
    pthread_mutex_unlock(&C.lock);
    return b ? b : malloc(G.super.block_size);
}

static void buf_drop_locked(sqfs_u8 *b) {
    if (b && C.nspare < C.n)
        C.spare[C.nspare++] = b;
    else
        free(b);
}

static sqfs_u8 *zeros;             /* a sparse block */

/* A block found or made: pinned (release with blk_put); *tmp is set when it could not be cached. */
static int blk_get(ctx_t *c, uint64_t loc, uint32_t word, uint32_t want, blk_t **out, blk_t *tmp) {
    pthread_mutex_lock(&C.lock);
    for (size_t i = 0; i < C.n; i++)
        if (C.b[i].valid && C.b[i].loc == loc) {
            C.b[i].refs++, C.b[i].used = ++C.tick;
            pthread_mutex_unlock(&C.lock);
            *out = &C.b[i];       /* pinned: the caller releases it, also on error */
            return C.b[i].len < want ? EIO : 0;
        }
    pthread_mutex_unlock(&C.lock);

    /* not cached: read and decompress into a fresh buffer, outside the lock */
    uint32_t size = SQFS_ON_DISK_BLOCK_SIZE(word);
    if (size > G.super.block_size)
        return EIO;
    sqfs_u8 *buf = buf_new();
    if (!buf)
        return ENOMEM;
    sqfs_s32 len;
    if (!SQFS_IS_BLOCK_COMPRESSED(word)) {
        len = img_read_at(&G.file.base, loc, buf, size) ? -1 : (sqfs_s32)size;
    } else {
        len = img_read_at(&G.file.base, loc, c->raw, size) ? -1
              : c->cmp->do_block(c->cmp, c->raw, size, buf, G.super.block_size);
    }
    if (len < 0 || (uint32_t)len < want) {
        pthread_mutex_lock(&C.lock);
        buf_drop_locked(buf);
        pthread_mutex_unlock(&C.lock);
        return EIO;
    }

    pthread_mutex_lock(&C.lock);
    blk_t *victim = NULL;
    for (size_t i = 0; i < C.n; i++) {
        blk_t *b = &C.b[i];
        if (b->valid && b->loc == loc) {          /* another thread made it meanwhile */
            b->refs++, b->used = ++C.tick;
            buf_drop_locked(buf);
            pthread_mutex_unlock(&C.lock);
            *out = b;
            return b->len < want ? EIO : 0;
        }
        if (!b->refs && (!victim || !b->valid || (victim->valid && b->used < victim->used)))
            victim = b;
    }
    if (!victim) {                                /* every entry pinned: this reader's own copy */
        pthread_mutex_unlock(&C.lock);
        *tmp = (blk_t){loc, (uint32_t)len, 1, 0, 0, buf};
        *out = tmp;
        return 0;
    }
    buf_drop_locked(victim->data);
    *victim = (blk_t){loc, (uint32_t)len, 1, ++C.tick, 1, buf};
    pthread_mutex_unlock(&C.lock);
    *out = victim;
    return 0;
}

static void blk_put(blk_t *b, blk_t *tmp) {
    pthread_mutex_lock(&C.lock);
    if (b == tmp)
        buf_drop_locked(tmp->data);
    else
        b->refs--;
    pthread_mutex_unlock(&C.lock);
}

/* ---- per-inode caches: what open and opendir used to compute, kept by node id ----
   The kernel is told that open and opendir need no server (FUSE_CAP_NO_OPEN_SUPPORT, ..._NO_OPENDIR_SUPPORT): no
   OPEN, RELEASE, OPENDIR or RELEASEDIR round trips, and READ and READDIRPLUS come with fh 0, naming the inode
   only. A regular file's block list and a directory's listing are therefore kept here, in a direct-mapped table
   per kind (a clash replaces the older one); each object is reference-counted, so that one replaced while a
   reader uses it lives until that reader is done. */

typedef struct {
    fuse_ino_t ino;
    unsigned refs;                /* the table's and each user's (under the table's lock) */
} cached_t;

typedef struct {
    pthread_mutex_t lock;
    cached_t **slot;
    unsigned bits;                /* 1 << bits slots */
    void (*destroy)(cached_t *);
} icache_t;

static size_t slot_of(const icache_t *t, fuse_ino_t ino) {
    return (size_t)(((uint64_t)ino * 0x9E3779B97F4A7C15ull) >> (64 - t->bits));
}

static cached_t *icache_get(icache_t *t, fuse_ino_t ino) {
    pthread_mutex_lock(&t->lock);
    cached_t *o = t->slot[slot_of(t, ino)];
    if (o && o->ino == ino)
        o->refs++;
    else
        o = NULL;
    pthread_mutex_unlock(&t->lock);
    return o;
}

/* Keeps a fresh object (one reference: the caller's), unless another thread kept one for the inode meanwhile:
   returns the one kept, with a reference for the caller. */
static cached_t *icache_add(icache_t *t, cached_t *o) {
    pthread_mutex_lock(&t->lock);
    size_t i = slot_of(t, o->ino);
    cached_t *old = t->slot[i], *gone = NULL;
    if (old && old->ino == o->ino) {
        old->refs++;
        pthread_mutex_unlock(&t->lock);
        t->destroy(o);
        return old;
    }
    if (old && --old->refs == 0)
        gone = old;
    o->refs++;
    t->slot[i] = o;
    pthread_mutex_unlock(&t->lock);
    if (gone)
        t->destroy(gone);
    return o;
}

static void icache_put(icache_t *t, cached_t *o) {
    pthread_mutex_lock(&t->lock);
    int last = --o->refs == 0;
    pthread_mutex_unlock(&t->lock);
    if (last)
        t->destroy(o);
}

/* Forgets o (if still kept): a big listing, once read to its end, is the kernel's to cache. */
static void icache_forget(icache_t *t, cached_t *o) {
    pthread_mutex_lock(&t->lock);
    size_t i = slot_of(t, o->ino);
    int last = 0;
    if (t->slot[i] == o) {
        t->slot[i] = NULL;
        last = --o->refs == 0;
    }
    pthread_mutex_unlock(&t->lock);
    if (last)
        t->destroy(o);
}

/* A regular file: its inode and where each of its blocks lies. */
typedef struct {
    cached_t c;                   /* first: the cache's header */
    sqfs_inode_generic_t *n;
    uint64_t size;
    size_t nblocks;               /* full-size (or last, short) blocks; the rest is the tail fragment */
    uint64_t *loc;                /* on-disk offset of each block */
    sqfs_fragment_t frag;
    uint32_t frag_off;
    int has_frag;
} ofile_t;

static void ofile_free(ofile_t *f) {
    if (!f)
        return;
    sqfs_free(f->n);
    free(f->loc);
    free(f);
}
static void ofile_destroy(cached_t *o) { ofile_free((ofile_t *)o); }
static cached_t *files_slots[1 << 10];
static icache_t files = {PTHREAD_MUTEX_INITIALIZER, files_slots, 10, ofile_destroy};

static int ofile_new(sqfs_inode_generic_t *n, ofile_t **out) {
    ofile_t *f = calloc(1, sizeof *f);
    if (!f)
        return ENOMEM;
    f->n = n;
    sqfs_u64 start = 0;
    sqfs_u32 fidx = 0xffffffff, foff = 0;
    sqfs_inode_get_file_size(n, &f->size);
    sqfs_inode_get_file_block_start(n, &start);
    sqfs_inode_get_frag_location(n, &fidx, &foff);
    f->nblocks = sqfs_inode_get_file_block_count(n);
    uint64_t bs = G.super.block_size;
    f->has_frag = fidx != 0xffffffff && f->size % bs != 0;
    /* the blocks the size calls for must be there, and the tail in a fragment or a block */
    size_t want = (size_t)(f->has_frag ? f->size / bs : (f->size + bs - 1) / bs);
    int err = f->nblocks != want ? EIO : 0;
    if (!err && f->has_frag) {
        f->frag_off = foff;
        if (sqfs_frag_table_lookup(G.frags, fidx, &f->frag) ||
            (uint64_t)foff + f->size % bs > bs)
            err = EIO;
    }
    if (!err && !(f->loc = malloc((f->nblocks ? f->nblocks : 1) * sizeof *f->loc)))
        err = ENOMEM;
    for (size_t i = 0; !err && i < f->nblocks; i++) {
        f->loc[i] = start;
        start += SQFS_ON_DISK_BLOCK_SIZE(n->extra[i]);
    }
    if (err) {
        f->n = NULL;               /* the caller still owns the inode */
        ofile_free(f);
        return err;
    }
    *out = f;
    return 0;
}

/* ---- inodes ---- */

static uint64_t ref_of(fuse_ino_t ino) { return ino == FUSE_ROOT_ID ? G.super.root_inode_ref : ino - 2; }
static fuse_ino_t ino_of(uint64_t ref) { return ref == G.super.root_inode_ref ? FUSE_ROOT_ID : ref + 2; }

static int read_inode(ctx_t *c, uint64_t ref, sqfs_inode_generic_t **out) {
    /* (the block is relative to the inode table: the reader adds its start) */
    int rc = sqfs_meta_reader_read_inode(c->inodes, &G.super, ref >> 16, ref & 0xffff, out);
    return rc ? (rc == SQFS_ERROR_ALLOC ? ENOMEM : EIO) : 0;
}

static int fill_stat(const sqfs_inode_generic_t *n, struct stat *st) {
    memset(st, 0, sizeof *st);
    sqfs_u32 uid, gid;
    if (sqfs_id_table_index_to_id(G.ids, n->base.uid_idx, &uid) ||
        sqfs_id_table_index_to_id(G.ids, n->base.gid_idx, &gid))
        return EIO;
    st->st_ino = n->base.inode_number;
    st->st_mode = n->base.mode;
    st->st_uid = uid;
    st->st_gid = gid;
    st->st_atime = st->st_mtime = st->st_ctime = n->base.mod_time;
    st->st_blksize = G.super.block_size;
    st->st_nlink = 1;
    switch (n->base.type) {
    case SQFS_INODE_DIR:
        st->st_nlink = n->data.dir.nlink;      /* size 0, as squashfuse_ll shows directories */
        break;
    case SQFS_INODE_EXT_DIR:
        st->st_nlink = n->data.dir_ext.nlink;
        break;
    case SQFS_INODE_FILE:
        st->st_size = n->data.file.file_size;
        break;
    case SQFS_INODE_EXT_FILE:
        st->st_nlink = n->data.file_ext.nlink, st->st_size = (off_t)n->data.file_ext.file_size;
        break;
    case SQFS_INODE_SLINK:
        st->st_nlink = n->data.slink.nlink, st->st_size = n->data.slink.target_size;
        break;
    case SQFS_INODE_EXT_SLINK:
        st->st_nlink = n->data.slink_ext.nlink, st->st_size = n->data.slink_ext.target_size;
        break;
    case SQFS_INODE_BDEV: case SQFS_INODE_CDEV:
        st->st_nlink = n->data.dev.nlink;
        st->st_rdev = makedev((n->data.dev.devno >> 8) & 0xfff, (n->data.dev.devno & 0xff) | ((n->data.dev.devno >> 12) & 0xfff00));
        break;
    case SQFS_INODE_EXT_BDEV: case SQFS_INODE_EXT_CDEV:
        st->st_nlink = n->data.dev_ext.nlink;
        st->st_rdev = makedev((n->data.dev_ext.devno >> 8) & 0xfff,
                              (n->data.dev_ext.devno & 0xff) | ((n->data.dev_ext.devno >> 12) & 0xfff00));
        break;
    case SQFS_INODE_FIFO: case SQFS_INODE_SOCKET:
        st->st_nlink = n->data.ipc.nlink;
        break;
    case SQFS_INODE_EXT_FIFO: case SQFS_INODE_EXT_SOCKET:
        st->st_nlink = n->data.ipc_ext.nlink;
        break;
    default:
        return EIO;
    }
    if (S_ISREG(st->st_mode))
        st->st_blocks = st->st_size / 512;   /* as squashfuse_ll counts them */
    return 0;
}

static int is_dir(const sqfs_inode_generic_t *n) {
    return n->base.type == SQFS_INODE_DIR || n->base.type == SQFS_INODE_EXT_DIR;
}
static int is_file(const sqfs_inode_generic_t *n) {
    return n->base.type == SQFS_INODE_FILE || n->base.type == SQFS_INODE_EXT_FILE;
}

/* ---- directories: read whole, kept per inode (the kernel caches the listing; lookups search it) ---- */

typedef struct {
    uint64_t ref;
    uint32_t inum;
    uint16_t type;
    char name[];
} dent_t;

typedef struct {
    cached_t c;                   /* first: the cache's header */
    size_t n;
    dent_t **ents;                /* sorted by name, as the image keeps them */
} dir_t;

static void dir_free(dir_t *d) {
    if (!d)
        return;
    for (size_t i = 0; i < d->n; i++)
        free(d->ents[i]);
    free(d->ents);
    free(d);
}
static void dir_destroy(cached_t *o) { dir_free((dir_t *)o); }
static cached_t *dirs_slots[1 << 8];
static icache_t dirs = {PTHREAD_MUTEX_INITIALIZER, dirs_slots, 8, dir_destroy};
#define BIG_DIR 4096              /* entries: a listing this long is forgotten once read to its end */

/* Walks directory `n`; for each entry calls `fn` (non-zero stops the walk, and is returned). */
static int dir_walk(ctx_t *c, const sqfs_inode_generic_t *n, int (*fn)(void *, sqfs_dir_entry_t *, uint32_t,
                                                                          uint64_t), void *arg) {
    sqfs_readdir_state_t s;
    if (sqfs_readdir_state_init(&s, &G.super, n))
        return EIO;
    for (;;) {
        sqfs_dir_entry_t *e = NULL;
        sqfs_u32 inum;
        sqfs_u64 iref;
        int rc = sqfs_meta_reader_readdir(c->dirs, &s, &e, &inum, &iref);
        if (rc > 0)
            return 0;
        if (rc < 0)
            return rc == SQFS_ERROR_ALLOC ? ENOMEM : EIO;
        rc = fn(arg, e, inum, iref);
        sqfs_free(e);
        if (rc)
            return rc;
    }
}

static int collect(void *arg, sqfs_dir_entry_t *e, uint32_t inum, uint64_t iref) {
    dir_t *d = arg;
    if ((d->n & (d->n - 1)) == 0) {             /* capacity: powers of two */
        dent_t **m = realloc(d->ents, (d->n ? 2 * d->n : 1) * sizeof *m);
        if (!m)
            return ENOMEM;
        d->ents = m;
    }
    dent_t *x = malloc(sizeof *x + e->size + 2);
    if (!x)
        return ENOMEM;
    x->ref = iref, x->inum = inum, x->type = e->type;
    memcpy(x->name, e->name, e->size + 1u);
    x->name[e->size + 1] = 0;
    d->ents[d->n++] = x;
    return 0;
}

/* Directory ino's listing, read once and kept (the caller puts it back with icache_put(&dirs, ...)). */
static int dir_get(ctx_t *c, fuse_ino_t ino, dir_t **out) {
    dir_t *d = (dir_t *)icache_get(&dirs, ino);
    if (d) {
        *out = d;
        return 0;
    }
    sqfs_inode_generic_t *n = NULL;
    int err = read_inode(c, ref_of(ino), &n);
    if (!err && !is_dir(n))
        err = ENOTDIR;
    if (!err && !(d = calloc(1, sizeof *d)))
        err = ENOMEM;
    if (!err)
        err = dir_walk(c, n, collect, d);
    sqfs_free(n);
    if (err) {                           /* nothing half-read is kept */
        dir_free(d);
        return err;
    }
    d->c = (cached_t){ino, 1};
    *out = (dir_t *)icache_add(&dirs, &d->c);
    return 0;
}

/* Regular file ino's block list, made once and kept (put back with icache_put(&files, ...)). */
static int ofile_get(ctx_t *c, fuse_ino_t ino, ofile_t **out) {
    ofile_t *f = (ofile_t *)icache_get(&files, ino);
    if (f) {
        *out = f;
        return 0;
    }
    sqfs_inode_generic_t *n = NULL;
    int err = read_inode(c, ref_of(ino), &n);
    if (!err && !is_file(n))
        err = is_dir(n) ? EISDIR : EINVAL;
    if (!err)
        err = ofile_new(n, &f);
    if (err) {
        sqfs_free(n);
        return err;
    }
    f->c = (cached_t){ino, 1};
    *out = (ofile_t *)icache_add(&files, &f->c);
    return 0;
}

/* ---- operations ---- */

static int no_open, no_opendir;

static void op_init(void *ud, struct fuse_conn_info *conn) {
    (void)ud;
    /* max_readahead stays at what the kernel offers (it only lowers it); max_write sets the largest request
       (libfuse asks max_pages from it: 1 MiB reads); the cache flags where the kernel offers them */
    conn->max_write = 1u << 20;
    conn->want |= conn->capable & (FUSE_CAP_CACHE_SYMLINKS | FUSE_CAP_PARALLEL_DIROPS | FUSE_CAP_ASYNC_READ |
                                   FUSE_CAP_READDIRPLUS);
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;   /* always plus: `find`/`ls -l` then need no lookups */
    conn->time_gran = 1000000000;
    /* open and opendir answered by the kernel (see the per-inode caches): ENOSYS to the first of each */
    no_open = !!(conn->capable & FUSE_CAP_NO_OPEN_SUPPORT);
    no_opendir = !!(conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT);
}

static void reply_entry(fuse_req_t req, ctx_t *c, uint64_t ref) {
    sqfs_inode_generic_t *n = NULL;
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    int err = read_inode(c, ref, &n);
    if (!err)
        err = fill_stat(n, &e.attr);
    sqfs_free(n);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    e.ino = ino_of(ref);
    e.generation = 1;
    e.attr_timeout = e.entry_timeout = FOREVER;
    fuse_reply_entry(req, &e);
}

/* The entry called name in a listing (sorted bytewise, as mksquashfs and tar2sqfs write them), or NULL. */
static const dent_t *dir_find(const dir_t *d, const char *name) {
    size_t lo = 0, hi = d->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int cmp = strcmp(d->ents[mid]->name, name);
        if (cmp == 0)
            return d->ents[mid];
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    ctx_t *c = ctx();
    dir_t *d = NULL;
    int err = c ? dir_get(c, parent, &d) : ENOMEM;
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    const dent_t *x = strlen(name) <= 256 ? dir_find(d, name) : NULL;
    uint64_t ref = x ? x->ref : 0;
    icache_put(&dirs, &d->c);
    if (!x) {                           /* a negative entry, cached as long as the rest */
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.entry_timeout = FOREVER;
        fuse_reply_entry(req, &e);
    } else {
        reply_entry(req, c, ref);
    }
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    ctx_t *c = ctx();
    sqfs_inode_generic_t *n = NULL;
    struct stat st;
    int err = c ? read_inode(c, ref_of(ino), &n) : ENOMEM;
    if (!err)
        err = fill_stat(n, &st);
    sqfs_free(n);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, &st, FOREVER);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino) {
    ctx_t *c = ctx();
    sqfs_inode_generic_t *n = NULL;
    int err = c ? read_inode(c, ref_of(ino), &n) : ENOMEM;
    if (!err && n->base.type != SQFS_INODE_SLINK && n->base.type != SQFS_INODE_EXT_SLINK)
        err = EINVAL;
    if (err) {
        sqfs_free(n);
        fuse_reply_err(req, err);
        return;
    }
    size_t len = n->base.type == SQFS_INODE_SLINK ? n->data.slink.target_size : n->data.slink_ext.target_size;
    char *t = malloc(len + 1);
    if (!t) {
        sqfs_free(n);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    memcpy(t, n->extra, len);
    t[len] = 0;
    sqfs_free(n);
    fuse_reply_readlink(req, t);
    free(t);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if ((fi->flags & O_ACCMODE) != O_RDONLY) {  /* (the mount is read-only too: see main) */
        fuse_reply_err(req, EROFS);
        return;
    }
    if (no_open) {                       /* the kernel opens every later file itself, keeping its cache */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    ctx_t *c = ctx();
    ofile_t *f = NULL;
    int err = c ? ofile_get(c, ino, &f) : ENOMEM;
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    icache_put(&files, &f->c);
    fi->fh = 0;                          /* reads find the file by its inode, as without open */
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

/* A request is at most 1 MiB (max_pages 256); blocks are at least 4 KiB. A FUSE read is never short (the kernel
   would take a short read for the end of the file): every block of the request or an error. */
#define MAXIOV 260

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    ctx_t *c = ctx();
    ofile_t *f = NULL;
    int err = c ? ofile_get(c, ino, &f) : ENOMEM;
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    uint64_t bs = G.super.block_size, pos = (uint64_t)off;
    uint64_t end = pos < f->size ? (size < f->size - pos ? pos + size : f->size) : pos;
    struct iovec iov[MAXIOV];
    blk_t *held[MAXIOV], tmps[MAXIOV];
    int k = 0;
    while (pos < end && k < MAXIOV) {
        uint64_t idx = pos / bs, in = pos % bs;
        uint64_t base = idx * bs, avail = (f->size - base < bs ? f->size - base : bs);
        const sqfs_u8 *data;
        blk_t *b = NULL;
        if (idx < f->nblocks) {
            uint32_t word = f->n->extra[idx];
            if (SQFS_IS_SPARSE_BLOCK(word)) {
                data = zeros;
            } else if ((err = blk_get(c, f->loc[idx], word, (uint32_t)avail, &b, &tmps[k]))) {
                if (b)
                    blk_put(b, &tmps[k]);
                break;
            } else {
                data = b->data;
            }
        } else {                 /* the tail, in a fragment block */
            if ((err = blk_get(c, f->frag.start_offset, f->frag.size, f->frag_off + (uint32_t)avail, &b,
                               &tmps[k]))) {
                if (b)
                    blk_put(b, &tmps[k]);
                break;
            }
            data = b->data + f->frag_off;
        }
        uint64_t n = (end - base < avail ? end - base : avail) - in;
        iov[k].iov_base = (void *)(data + in);
        iov[k].iov_len = n;
        held[k++] = b;
        pos += n;
    }
    if (!err && pos < end)
        err = EIO;
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_iov(req, iov, k);
    for (int i = 0; i < k; i++)
        if (held[i])
            blk_put(held[i], &tmps[i]);
    icache_put(&files, &f->c);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;                           /* (the kernel sends opendir for directories only) */
    if (no_opendir) {                    /* the kernel opens every later directory itself, caching listings */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    fi->fh = 0;                          /* readdir finds the listing by its inode */
    fi->keep_cache = 1;
    fi->cache_readdir = 1;
    fuse_reply_open(req, fi);
}

static mode_t dtype_mode(uint16_t t) {
    switch (t) {
    case SQFS_INODE_DIR: case SQFS_INODE_EXT_DIR: return S_IFDIR;
    case SQFS_INODE_FILE: case SQFS_INODE_EXT_FILE: return S_IFREG;
    case SQFS_INODE_SLINK: case SQFS_INODE_EXT_SLINK: return S_IFLNK;
    case SQFS_INODE_BDEV: case SQFS_INODE_EXT_BDEV: return S_IFBLK;
    case SQFS_INODE_CDEV: case SQFS_INODE_EXT_CDEV: return S_IFCHR;
    case SQFS_INODE_FIFO: case SQFS_INODE_EXT_FIFO: return S_IFIFO;
    default: return S_IFSOCK;
    }
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus) {
    ctx_t *c = ctx();
    dir_t *d = NULL;
    int err = c ? dir_get(c, ino, &d) : ENOMEM;
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    char *buf = malloc(size);
    if (!buf) {
        icache_put(&dirs, &d->c);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t used = 0, i;
    for (i = (size_t)off; i < d->n; i++) {
        dent_t *x = d->ents[i];
        size_t want;
        if (plus) {
            struct fuse_entry_param e;
            memset(&e, 0, sizeof e);
            sqfs_inode_generic_t *n = NULL;
            err = read_inode(c, x->ref, &n);
            if (!err)
                err = fill_stat(n, &e.attr);
            sqfs_free(n);
            if (err) {
                if (used)
                    break;
                free(buf);
                icache_put(&dirs, &d->c);
                fuse_reply_err(req, err);
                return;
            }
            e.ino = ino_of(x->ref);
            e.generation = 1;
            e.attr_timeout = e.entry_timeout = FOREVER;
            want = fuse_add_direntry_plus(req, buf + used, size - used, x->name, &e, (off_t)i + 1);
        } else {
            struct stat st;
            memset(&st, 0, sizeof st);
            st.st_ino = x->inum;
            st.st_mode = dtype_mode(x->type);
            want = fuse_add_direntry(req, buf + used, size - used, x->name, &st, (off_t)i + 1);
        }
        if (want > size - used)
            break;                       /* did not fit: the next call starts here (a plus entry's lookup
                                            was not counted, as libfuse's examples rely on) */
        used += want;
    }
    if (i >= d->n && d->n > BIG_DIR)
        icache_forget(&dirs, &d->c);
    icache_put(&dirs, &d->c);
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    do_readdir(req, ino, size, off, 0);
}
static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    do_readdir(req, ino, size, off, 1);
}
static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    (void)ino;
    struct statvfs sv;
    memset(&sv, 0, sizeof sv);
    sv.f_bsize = sv.f_frsize = G.super.block_size;
    sv.f_blocks = (G.super.bytes_used + G.super.block_size - 1) / G.super.block_size;
    sv.f_files = G.super.inode_count;
    sv.f_namemax = 256;
    fuse_reply_statfs(req, &sv);
}

/* xattrs: list (name == NULL) or get one. size 0 asks for the length. */
static void do_xattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    ctx_t *c = ctx();
    sqfs_inode_generic_t *n = NULL;
    int err = c ? read_inode(c, ref_of(ino), &n) : ENOMEM;
    sqfs_u32 idx = 0xffffffff;
    if (!err)
        sqfs_inode_get_xattr_index(n, &idx);
    sqfs_free(n);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    char *out = NULL;
    size_t len = 0;
    int found = 0;
    sqfs_xattr_id_t desc;
    if (idx != 0xffffffff && c->xattrs && sqfs_xattr_reader_get_desc(c->xattrs, idx, &desc) == 0 &&
        sqfs_xattr_reader_seek_kv(c->xattrs, &desc) == 0) {
        for (sqfs_u32 i = 0; i < desc.count && !err && !found; i++) {
            sqfs_xattr_entry_t *k = NULL;
            sqfs_xattr_value_t *v = NULL;
            if (sqfs_xattr_reader_read_key(c->xattrs, &k) || sqfs_xattr_reader_read_value(c->xattrs, k, &v)) {
                sqfs_free(k);
                err = EIO;
                break;
            }
            /* the reader returns the key with its prefix ("user.") prepended, NUL-terminated */
            if (sqfs_get_xattr_prefix((SQFS_XATTR_TYPE)(k->type & SQFS_XATTR_PREFIX_MASK))) {
                const char *key = (const char *)k->key;
                size_t kl = strlen(key);
                if (!name) {             /* list: key NUL key NUL ... */
                    char *m = realloc(out, len + kl + 1);
                    if (!m) {
                        err = ENOMEM;
                    } else {
                        out = m;
                        memcpy(out + len, key, kl + 1);
                        len += kl + 1;
                    }
                } else if (!strcmp(name, key)) {
                    found = 1;
                    if ((out = malloc(v->size ? v->size : 1)))
                        memcpy(out, v->value, v->size), len = v->size;
                    else
                        err = ENOMEM;
                }
            }
            sqfs_free(k);
            sqfs_free(v);
        }
    }
    if (err)
        fuse_reply_err(req, err);
    else if (name && !found)
        fuse_reply_err(req, ENODATA);
    else if (size == 0)
        fuse_reply_xattr(req, len);
    else if (len > size)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, out, len);
    free(out);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    /* An image without xattrs: ENOSYS makes the kernel answer every later getxattr itself (EOPNOTSUPP), where
       overlayfs would otherwise ask once per entry it looks up (user.overlay.opaque): a `find` in a container
       went from one round trip per file to none. listxattr still answers (an empty list). */
    if (!G.has_xattrs) {
        fuse_reply_err(req, ENOSYS);
        return;
    }
    do_xattr(req, ino, name, size);
}
static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) { do_xattr(req, ino, NULL, size); }

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .readlink = op_readlink,
    .open = op_open,
    .read = op_read,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .statfs = op_statfs,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
};

/* ---- start-up ---- */

static _Noreturn void fail(const char *image, const char *what) {
    fprintf(stderr, PROG ": %s: %s\n", image, what);
    exit(1);
}

static uint64_t table_end(uint64_t start) {
    const uint64_t starts[] = {G.super.inode_table_start, G.super.directory_table_start,
                               G.super.fragment_table_start, G.super.export_table_start,
                               G.super.id_table_start, G.super.xattr_id_table_start, G.super.bytes_used};
    uint64_t end = G.super.bytes_used;
    for (size_t i = 0; i < sizeof starts / sizeof *starts; i++)
        if (starts[i] > start && starts[i] < end)
            end = starts[i];
    return end;
}

#define SQUASHFUSE_LL "/usr/bin/squashfuse_ll"
static char **g_argv;

/* A compressor libsquashfs lacks (lzo: squashfs-tools-ng keeps it out of the LGPL library, liblzo2 being GPL):
   squashfuse_ll serves the image instead, with the same arguments (the FUSE fd stays open across exec). */
static void other_server(const char *image, const char *why) {
    execv(SQUASHFUSE_LL, g_argv);     /* (it takes the same options: -f, -o offset=N) */
    fprintf(stderr, PROG ": %s: %s, and " SQUASHFUSE_LL " cannot serve it: %s\n", image, why, strerror(errno));
    exit(1);
}

static void open_image(const char *image, uint64_t offset) {
    char why[160];
    int fd = open(image, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        fail(image, strerror(errno));
    if (!S_ISREG(st.st_mode))
        fail(image, "not a regular file");
    if ((uint64_t)st.st_size < offset)
        fail(image, "offset beyond the end of the file");
    G.file = (img_file_t){{{img_destroy, NULL}, img_read_at, img_write_at, img_get_size, img_truncate},
                          fd, offset, (uint64_t)st.st_size - offset};
    int rc = sqfs_super_read(&G.super, &G.file.base);
    if (rc) {
        snprintf(why, sizeof why, "not a valid squashfs image (%s)", sqfs_err(rc));
        fail(image, why);
    }
    if (G.super.bytes_used > G.file.size) {
        snprintf(why, sizeof why, "truncated squashfs image (%llu of %llu bytes)",
                 (unsigned long long)G.file.size, (unsigned long long)G.super.bytes_used);
        fail(image, why);
    }
    if (!(G.ids = sqfs_id_table_create(0)) || !(G.frags = sqfs_frag_table_create(0)) ||
        !(zeros = calloc(1, G.super.block_size)))
        fail(image, "out of memory");
    G.has_xattrs = !(G.super.flags & SQFS_FLAG_NO_XATTRS) && G.super.xattr_id_table_start != UINT64_MAX;
    sqfs_xattr_id_table_t xt;
    if (G.has_xattrs && img_read_at(&G.file.base, G.super.xattr_id_table_start, &xt, sizeof xt) == 0 &&
        le32toh(xt.xattr_ids) == 0)
        G.has_xattrs = 0;                /* a table with no entries */
    sqfs_compressor_config_t cc;
    sqfs_compressor_t *probe = NULL;
    if (sqfs_compressor_config_init(&cc, (SQFS_COMPRESSOR)G.super.compression_id, G.super.block_size,
                                    SQFS_COMP_FLAG_UNCOMPRESS) == 0 &&
        sqfs_compressor_create(&cc, &probe) == SQFS_ERROR_UNSUPPORTED) {
        const char *name = sqfs_compressor_name_from_id((SQFS_COMPRESSOR)G.super.compression_id);
        snprintf(why, sizeof why, "its compressor (%s) is not in libsquashfs", name ? name : "unknown");
        other_server(image, why);
    }
    sqfs_destroy(probe);
    G.inode_limit = table_end(G.super.inode_table_start);
    G.dir_limit = table_end(G.super.directory_table_start);
    int err = 0;
    ctx_t *c = NULL;
    if (!(c = ctx_new(&rc)) ||
        (rc = sqfs_id_table_read(G.ids, &G.file.base, &G.super, c->cmp)) ||
        (!(G.super.flags & SQFS_FLAG_NO_FRAGMENTS) && G.super.fragment_entry_count &&
         (rc = sqfs_frag_table_read(G.frags, &G.file.base, &G.super, c->cmp)))) {
        snprintf(why, sizeof why, "corrupt squashfs image (%s)", sqfs_err(rc));
        fail(image, why);
    }
    /* the root must read, and be a directory whose listing reads */
    sqfs_inode_generic_t *root = NULL;
    struct stat rst;
    if ((err = read_inode(c, G.super.root_inode_ref, &root)) || fill_stat(root, &rst) || !is_dir(root))
        fail(image, "corrupt squashfs image (its root directory does not read)");
    dir_t *d = calloc(1, sizeof *d);
    if (!d)
        fail(image, "out of memory");
    if (dir_walk(c, root, collect, d))
        fail(image, "corrupt squashfs image (its root directory does not read)");
    d->c = (cached_t){FUSE_ROOT_ID, 1};  /* kept: the first readdir and lookups of / need not read it again */
    icache_put(&dirs, icache_add(&dirs, &d->c));
    sqfs_free(root);
    first_ctx = c;                       /* its readers hold the root's blocks: the first request's too */
}

struct opts { char *image, *mountpoint; unsigned long long offset; int nonopt; };

static const struct fuse_opt opt_spec[] = {
    {"offset=%llu", offsetof(struct opts, offset), 0},
    FUSE_OPT_END,
};

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *out) {
    struct opts *o = data;
    (void)out;
    if (key == FUSE_OPT_KEY_NONOPT && !o->image) {
        o->image = strdup(arg);
        return 0;                        /* the image: not for libfuse */
    }
    return 1;
}

static unsigned cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return (unsigned)CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

int main(int argc, char **argv) {
    g_argv = argv;
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct opts o = {0};
    struct fuse_cmdline_opts co;
    if (fuse_opt_parse(&args, &o, opt_spec, opt_proc) || fuse_parse_cmdline(&args, &co)) {
        fprintf(stderr, PROG ": bad arguments (usage: " PROG " [-f] [-o offset=N] IMAGE MOUNTPOINT)\n");
        return 2;
    }
    if (co.show_help || co.show_version || !o.image || !co.mountpoint) {
        printf("usage: " PROG " [-f] [-o offset=N,...] IMAGE MOUNTPOINT\n");
        if (co.show_help)
            fuse_cmdline_help(), fuse_lowlevel_help();
        return co.show_help || co.show_version ? 0 : 2;
    }
    if (pthread_key_create(&G.key, ctx_free))
        return 1;
    open_image(o.image, o.offset);       /* refuses a bad image before anything is mounted */
    unsigned threads = cpus();
    if (threads < 4)
        threads = 4;
    if (threads > 64)
        threads = 64;
    /* the block cache: 8 blocks per thread (a 1 MiB request pins up to 9 of 128 KiB), at least 32. Small: its
       job is the blocks that neighbouring requests share (the page cache keeps what was read); a larger one
       costs page faults on its first fill (32 MiB of 128 KiB blocks: 8192) */
    C.n = 8 * threads;
    if (C.n < 32)
        C.n = 32;
    if (!(C.b = calloc(C.n, sizeof *C.b)) || !(C.spare = calloc(C.n, sizeof *C.spare))) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }

    /* read-only: the kernel opens files without asking (no_open), so it must refuse writes itself (EROFS).
       (On a /dev/fd/N mount point the caller's mount flags apply: nagaya mounts it MS_RDONLY.) */
    if (fuse_opt_add_arg(&args, "-oro")) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (!se) {
        fprintf(stderr, PROG ": bad FUSE options\n");
        return 2;
    }
    if (fuse_set_signal_handlers(se) || fuse_session_mount(se, co.mountpoint)) {
        fprintf(stderr, PROG ": cannot mount %s\n", co.mountpoint);
        return 1;
    }
    if (fuse_daemonize(co.foreground))
        return 1;
    struct fuse_loop_config *lc = fuse_loop_cfg_create();
    int rc;
    if (co.singlethread || !lc) {
        rc = fuse_session_loop(se);
    } else {
        /* idle threads are kept (each holds its readers), up to max_threads */
        fuse_loop_cfg_set_max_threads(lc, threads);
        fuse_loop_cfg_set_idle_threads(lc, threads);
        fuse_loop_cfg_set_clone_fd(lc, (unsigned)co.clone_fd);
        rc = fuse_session_loop_mt(se, lc);
        fuse_loop_cfg_destroy(lc);
    }
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    free(co.mountpoint);
    free(o.image);
    fuse_opt_free_args(&args);
    return rc ? 1 : 0;
}
