/*
 * reader.c: read a shared memory segment that Python (mpshm) created.
 *
 * mpshm's segments are plain operating-system objects, so any language reads
 * them with the usual system calls:
 *
 *   reader posix NAME LENGTH   NAME as mpshm prints it (psm_...): shm_open + mmap
 *   reader sysv  KEY  LENGTH   KEY from a name "sysv:0x...": shmget + shmat
 *
 * It prints the segment's size and its first LENGTH bytes as text.
 * Build:  cc -std=c99 -Wall -o reader reader.c -lrt
 * (-lrt: shm_open is in librt with glibc before 2.34; harmless after.)
 */
#define _XOPEN_SOURCE 700 /* shm_open, mmap, shmget with -std=c99 */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <unistd.h>

static void show(const char *what, const char *name, size_t size, const char *data,
                 size_t length)
{
    printf("%s %s: %zu bytes, read \"%.*s\"\n", what, name, size, (int)length, data);
}

/* POSIX: the object "/NAME" (shm_open wants the leading slash; mpshm's
 * names leave it out, like the standard library's). */
static int read_posix(const char *name, size_t length)
{
    char path[256];
    struct stat st;
    void *data;
    int fd;

    snprintf(path, sizeof path, "/%s", name);
    fd = shm_open(path, O_RDONLY, 0);
    if (fd < 0) {
        perror("shm_open");
        return 1;
    }
    if (fstat(fd, &st) < 0) {
        perror("fstat");
        close(fd);
        return 1;
    }
    if ((size_t)st.st_size < length) {
        fprintf(stderr, "%s holds %lld bytes, fewer than %zu\n", name,
                (long long)st.st_size, length);
        close(fd);
        return 1;
    }
    data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd); /* the mapping stays valid without the descriptor */
    if (data == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    show("posix", name, (size_t)st.st_size, data, length);
    munmap(data, (size_t)st.st_size);
    return 0;
}

/* System V: the segment whose key is KEY (hex with 0x, or decimal). */
static int read_sysv(const char *key_text, size_t length)
{
    struct shmid_ds info;
    unsigned long key;
    char *end;
    void *data;
    int id;

    errno = 0;
    key = strtoul(key_text, &end, 0);
    if (errno != 0 || *end != '\0' || key > 0xffffffffUL) {
        fprintf(stderr, "not a System V key: %s\n", key_text);
        return 1;
    }
    id = shmget((key_t)key, 0, 0); /* size 0, no IPC_CREAT: an existing segment */
    if (id < 0) {
        perror("shmget");
        return 1;
    }
    if (shmctl(id, IPC_STAT, &info) < 0) {
        perror("shmctl");
        return 1;
    }
    if (info.shm_segsz < length) {
        fprintf(stderr, "%s holds %zu bytes, fewer than %zu\n", key_text,
                (size_t)info.shm_segsz, length);
        return 1;
    }
    data = shmat(id, NULL, SHM_RDONLY);
    if (data == (void *)-1) {
        perror("shmat");
        return 1;
    }
    show("sysv", key_text, (size_t)info.shm_segsz, data, length);
    shmdt(data);
    return 0;
}

int main(int argc, char **argv)
{
    size_t length;

    if (argc != 4) {
        fprintf(stderr, "usage: %s posix|sysv NAME|KEY LENGTH\n", argv[0]);
        return 2;
    }
    length = (size_t)strtoul(argv[3], NULL, 10);
    if (strcmp(argv[1], "posix") == 0)
        return read_posix(argv[2], length);
    if (strcmp(argv[1], "sysv") == 0)
        return read_sysv(argv[2], length);
    fprintf(stderr, "unknown kind %s: use posix or sysv\n", argv[1]);
    return 2;
}
