/*
 * pinguard: a PKCS#11 interposer that gives SoftHSM2 the card behaviour it lacks.
 *
 * SoftHSM2 (2.6) never locks a PIN: after a wrong PIN it only sets CKF_USER_PIN_COUNT_LOW
 * and it never reports CKF_USER_PIN_FINAL_TRY / CKF_USER_PIN_LOCKED. It has no pinpad and
 * its tokens cannot be pulled out. Real cards do all three, and pam_svmm must handle them,
 * so the lab loads this module instead of SoftHSM2. It forwards every call to the real
 * module and changes only what a token's state file asks for.
 *
 *   SVMM_PINGUARD_MODULE  real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   SVMM_PINGUARD_STATE   directory with one state file per token, named by the token's
 *                         serial number; no variable or no file: plain pass-through.
 *
 * A state file is plain text, one key=value per line (written by svmm_lab/pinguard.py):
 *   max_tries=3     user PIN retry counter (C_Login failures count down, success resets)
 *   tries_left=3    0 means locked: C_Login answers CKR_PIN_LOCKED without asking the token
 *   pinpad=/path    token has a protected authentication path; C_Login with a NULL PIN
 *                   reads the PIN from this file (the "keypad"). The file must be a regular
 *                   file owned by the caller's euid with no group/other access. A missing
 *                   file simulates the user cancelling on the keypad (CKR_FUNCTION_CANCELED).
 *   removed=1       token pulled out: slot lists with tokenPresent omit it, slot calls answer
 *                   CKR_TOKEN_NOT_PRESENT and session calls CKR_DEVICE_REMOVED.
 *
 * One mutex serialises state-file read-modify-write (and the C_Login it brackets) within a
 * process; files are replaced atomically.
 *
 * The reader: SoftHSM2's file store is not safe for several processes at once (C_Login
 * rewrites the token's file, and another process reading it meanwhile answers
 * CKR_GENERAL_ERROR), while a real card sits behind pcscd, which gives one process at a
 * time the reader. So every call that reaches the token store holds an exclusive flock(2)
 * on <state folder>/.reader.lock for the call (none without a state folder).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))
#define DEFAULT_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define MAX_PIN 256

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *real_handle;
static CK_FUNCTION_LIST_PTR real;      /* the real module's table */
static CK_FUNCTION_LIST guard;         /* a copy of it with our overrides */

struct state {
    int found;                         /* a state file exists for this token */
    long max_tries, tries_left;        /* max_tries < 0: no counter */
    int removed;
    char pinpad[PATH_MAX];             /* empty: no protected authentication path */
};

/* ---- state files ------------------------------------------------------------------- */

/* Token serial as a file name: the 16-byte field, trailing spaces cut, alnum only. */
static int serial_of(const CK_TOKEN_INFO *ti, char out[17])
{
    size_t n = sizeof ti->serialNumber;
    while (n > 0 && ti->serialNumber[n - 1] == ' ')
        n--;
    if (n == 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!isalnum(ti->serialNumber[i]))
            return -1;
        out[i] = (char)ti->serialNumber[i];
    }
    out[n] = '\0';
    return 0;
}

/* The state folder: $SVMM_PINGUARD_STATE, else the one compiled in (a host whose PAM
 * processes, login, su, sudo, get no lab environment), else none. */
#ifndef PINGUARD_DEFAULT_STATE
#define PINGUARD_DEFAULT_STATE ""
#endif
static const char *state_dir(void)
{
    const char *dir = getenv("SVMM_PINGUARD_STATE");
    if (dir == NULL || *dir == '\0')
        dir = PINGUARD_DEFAULT_STATE;
    return *dir == '\0' ? NULL : dir;
}

static int state_path(const char *serial, char *buf, size_t len)
{
    const char *dir = state_dir();
    if (dir == NULL || *dir == '\0')
        return -1;
    int n = snprintf(buf, len, "%s/%s", dir, serial);
    return (n < 0 || (size_t)n >= len) ? -1 : 0;
}

static void load_state(const char *serial, struct state *st)
{
    char path[PATH_MAX], line[PATH_MAX + 32];
    memset(st, 0, sizeof *st);
    st->max_tries = st->tries_left = -1;
    if (state_path(serial, path, sizeof path) != 0)
        return;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return;
    st->found = 1;
    while (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        char *val = strchr(line, '=');
        if (val == NULL)
            continue;
        *val++ = '\0';
        if (strcmp(line, "max_tries") == 0)
            st->max_tries = strtol(val, NULL, 10);
        else if (strcmp(line, "tries_left") == 0)
            st->tries_left = strtol(val, NULL, 10);
        else if (strcmp(line, "removed") == 0)
            st->removed = strcmp(val, "1") == 0;
        else if (strcmp(line, "pinpad") == 0)
            snprintf(st->pinpad, sizeof st->pinpad, "%s", val);
    }
    fclose(f);
    if (st->max_tries >= 0 && st->tries_left < 0)
        st->tries_left = st->max_tries;
}

/* Write the whole state back, atomically (temp file + rename). */
static void save_state(const char *serial, const struct state *st)
{
    char path[PATH_MAX], tmp[PATH_MAX + 32];
    if (state_path(serial, path, sizeof path) != 0)
        return;
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "we");
    if (f == NULL)
        return;
    if (st->max_tries >= 0)
        fprintf(f, "max_tries=%ld\ntries_left=%ld\n", st->max_tries, st->tries_left);
    if (st->pinpad[0] != '\0')
        fprintf(f, "pinpad=%s\n", st->pinpad);
    if (st->removed)
        fprintf(f, "removed=1\n");
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        unlink(tmp);
}

/* State of the token in a slot; serial filled when the token answered. */
static CK_RV slot_state(CK_SLOT_ID slot, struct state *st, char serial[17])
{
    CK_TOKEN_INFO ti;
    memset(st, 0, sizeof *st);
    st->max_tries = st->tries_left = -1;
    serial[0] = '\0';
    CK_RV rv = real->C_GetTokenInfo(slot, &ti);
    if (rv != CKR_OK)
        return rv;
    if (serial_of(&ti, serial) == 0)
        load_state(serial, st);
    return CKR_OK;
}

static CK_RV session_slot(CK_SESSION_HANDLE h, CK_SLOT_ID *slot)
{
    CK_SESSION_INFO si;
    CK_RV rv = real->C_GetSessionInfo(h, &si);
    if (rv == CKR_OK)
        *slot = si.slotID;
    return rv;
}

/* CKR_DEVICE_REMOVED when the session's token is marked removed, else CKR_OK. */
static CK_RV session_guard(CK_SESSION_HANDLE h)
{
    CK_SLOT_ID slot;
    struct state st;
    char serial[17];
    if (session_slot(h, &slot) != CKR_OK)
        return CKR_OK;  /* let the real call report the bad handle */
    if (slot_state(slot, &st, serial) == CKR_OK && st.removed)
        return CKR_DEVICE_REMOVED;
    return CKR_OK;
}

static int slot_removed(CK_SLOT_ID slot)
{
    struct state st;
    char serial[17];
    return slot_state(slot, &st, serial) == CKR_OK && st.removed;
}

/* The "keypad": read the PIN from a private file. 0 ok, 1 cancelled, -1 refused. */
static int read_pinpad(const char *path, CK_UTF8CHAR *pin, CK_ULONG *len)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 1 : -1;
    struct stat sb;
    ssize_t n = -1;
    if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_uid == geteuid()
        && (sb.st_mode & 077) == 0)
        n = read(fd, pin, MAX_PIN);
    close(fd);
    if (n < 0)
        return -1;
    while (n > 0 && (pin[n - 1] == '\n' || pin[n - 1] == '\r'))
        n--;
    if (n == 0)
        return 1;
    *len = (CK_ULONG)n;
    return 0;
}

/* ---- overridden functions ---------------------------------------------------------- */

static CK_RV guard_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
    if (!present || state_dir() == NULL)
        return real->C_GetSlotList(present, list, count);
    CK_SLOT_ID *all = NULL;
    CK_ULONG n = 0, kept = 0;
    CK_RV rv;
    /* The real list may grow between the two calls; retry a few times. */
    for (int attempt = 0; attempt < 4; attempt++) {
        rv = real->C_GetSlotList(CK_TRUE, NULL, &n);
        if (rv != CKR_OK)
            return rv;
        free(all);
        all = calloc(n ? n : 1, sizeof *all);
        if (all == NULL)
            return CKR_HOST_MEMORY;
        rv = real->C_GetSlotList(CK_TRUE, all, &n);
        if (rv != CKR_BUFFER_TOO_SMALL)
            break;
    }
    if (rv == CKR_OK) {
        for (CK_ULONG i = 0; i < n; i++)
            if (!slot_removed(all[i]))
                all[kept++] = all[i];
        if (list != NULL && *count < kept)
            rv = CKR_BUFFER_TOO_SMALL;
        else if (list != NULL)
            memcpy(list, all, kept * sizeof *all);
        *count = kept;
    }
    free(all);
    return rv;
}

static CK_RV guard_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
    CK_RV rv = real->C_GetSlotInfo(slot, info);
    if (rv == CKR_OK && slot_removed(slot))
        info->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
    return rv;
}

static CK_RV guard_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    CK_RV rv = real->C_GetTokenInfo(slot, info);
    char serial[17];
    struct state st;
    if (rv != CKR_OK || serial_of(info, serial) != 0)
        return rv;
    load_state(serial, &st);  /* readers need no lock: files are replaced atomically */
    if (st.removed)
        return CKR_TOKEN_NOT_PRESENT;
    if (st.max_tries >= 0) {
        /* Replace SoftHSM2's sticky COUNT_LOW with flags derived from our counter. */
        info->flags &= ~(CK_FLAGS)(CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY
                                   | CKF_USER_PIN_LOCKED);
        if (st.tries_left <= 0)
            info->flags |= CKF_USER_PIN_LOCKED;
        else if (st.tries_left == 1)
            info->flags |= CKF_USER_PIN_FINAL_TRY;
        else if (st.tries_left < st.max_tries)
            info->flags |= CKF_USER_PIN_COUNT_LOW;
    }
    if (st.pinpad[0] != '\0')
        info->flags |= CKF_PROTECTED_AUTHENTICATION_PATH;
    return CKR_OK;
}

static CK_RV guard_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                                    CK_ULONG_PTR count)
{
    if (slot_removed(slot))
        return CKR_TOKEN_NOT_PRESENT;
    return real->C_GetMechanismList(slot, list, count);
}

static CK_RV guard_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app,
                               CK_NOTIFY notify, CK_SESSION_HANDLE_PTR h)
{
    if (slot_removed(slot))
        return CKR_TOKEN_NOT_PRESENT;
    return real->C_OpenSession(slot, flags, app, notify, h);
}

static CK_RV guard_Login(CK_SESSION_HANDLE h, CK_USER_TYPE who, CK_UTF8CHAR_PTR pin,
                         CK_ULONG len)
{
    CK_SLOT_ID slot;
    struct state st;
    char serial[17];
    CK_UTF8CHAR keypad[MAX_PIN];
    CK_RV rv = session_slot(h, &slot);
    if (rv != CKR_OK || who != CKU_USER)
        return real->C_Login(h, who, pin, len);

    pthread_mutex_lock(&lock);
    rv = slot_state(slot, &st, serial);
    if (rv != CKR_OK || !st.found) {
        pthread_mutex_unlock(&lock);
        return rv != CKR_OK ? rv : real->C_Login(h, who, pin, len);
    }
    if (st.removed) {
        rv = CKR_DEVICE_REMOVED;
        goto out;
    }
    if (pin == NULL && st.pinpad[0] != '\0') {
        int r = read_pinpad(st.pinpad, keypad, &len);
        if (r != 0) {
            rv = r > 0 ? CKR_FUNCTION_CANCELED : CKR_GENERAL_ERROR;
            goto out;
        }
        pin = keypad;
    }
    if (st.max_tries >= 0 && st.tries_left <= 0) {
        rv = CKR_PIN_LOCKED;
        goto out;
    }
    rv = real->C_Login(h, who, pin, len);
    if (st.max_tries >= 0) {
        long before = st.tries_left;
        if (rv == CKR_PIN_INCORRECT)
            st.tries_left--;
        else if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN)
            st.tries_left = st.max_tries;
        if (st.tries_left != before)
            save_state(serial, &st);
    }
out:
    explicit_bzero(keypad, sizeof keypad);
    pthread_mutex_unlock(&lock);
    return rv;
}

/* Session calls on a removed token fail like on a real pulled card. */
#define GUARDED(name, params, args)                  \
    static CK_RV guard_##name params                 \
    {                                                \
        CK_RV grv = session_guard(h);                \
        return grv != CKR_OK ? grv : real->C_##name args; \
    }

GUARDED(FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
GUARDED(FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR n),
        (h, o, m, n))
GUARDED(GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
                            CK_ULONG n), (h, o, t, n))
GUARDED(SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
GUARDED(Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR s, CK_ULONG_PTR sl),
        (h, d, dl, s, sl))

/* ---- the reader: one process at a time in the token store ------------------------- */

static int reader_lock(void)
{
    char path[PATH_MAX];
    const char *dir = state_dir();
    if (dir == NULL || snprintf(path, sizeof path, "%s/.reader.lock", dir) >= (int)sizeof path)
        return -1;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0)
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR)
            ;
    return fd;
}

#define LOCKED(name, params, call)                   \
    static CK_RV locked_##name params                \
    {                                                \
        int fd = reader_lock();                      \
        CK_RV lrv = call;                            \
        if (fd >= 0)                                 \
            close(fd);                               \
        return lrv;                                  \
    }

LOCKED(Initialize, (CK_VOID_PTR a), real->C_Initialize(a))
LOCKED(Finalize, (CK_VOID_PTR a), real->C_Finalize(a))
LOCKED(GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR c), guard_GetSlotList(p, l, c))
LOCKED(GetSlotInfo, (CK_SLOT_ID s, CK_SLOT_INFO_PTR i), guard_GetSlotInfo(s, i))
LOCKED(GetTokenInfo, (CK_SLOT_ID s, CK_TOKEN_INFO_PTR i), guard_GetTokenInfo(s, i))
LOCKED(GetMechanismList, (CK_SLOT_ID s, CK_MECHANISM_TYPE_PTR l, CK_ULONG_PTR c),
       guard_GetMechanismList(s, l, c))
LOCKED(OpenSession, (CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n,
                     CK_SESSION_HANDLE_PTR h), guard_OpenSession(s, f, a, n, h))
LOCKED(CloseSession, (CK_SESSION_HANDLE h), real->C_CloseSession(h))
LOCKED(Login, (CK_SESSION_HANDLE h, CK_USER_TYPE w, CK_UTF8CHAR_PTR p, CK_ULONG l),
       guard_Login(h, w, p, l))
LOCKED(Logout, (CK_SESSION_HANDLE h), real->C_Logout(h))
LOCKED(FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n),
       guard_FindObjectsInit(h, t, n))
LOCKED(FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR n),
       guard_FindObjects(h, o, m, n))
LOCKED(FindObjectsFinal, (CK_SESSION_HANDLE h), real->C_FindObjectsFinal(h))
LOCKED(GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
                           CK_ULONG n), guard_GetAttributeValue(h, o, t, n))
LOCKED(SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k),
       guard_SignInit(h, m, k))
LOCKED(Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR s, CK_ULONG_PTR sl),
       guard_Sign(h, d, dl, s, sl))
LOCKED(DecryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k),
       real->C_DecryptInit(h, m, k))
LOCKED(Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR e, CK_ULONG el, CK_BYTE_PTR d,
                 CK_ULONG_PTR dl), real->C_Decrypt(h, e, el, d, dl))
LOCKED(DeriveKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE b,
                   CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k),
       real->C_DeriveKey(h, m, b, t, n, k))

/* ---- entry point ------------------------------------------------------------------- */

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
    CK_RV rv = CKR_OK;
    if (out == NULL)
        return CKR_ARGUMENTS_BAD;
    pthread_mutex_lock(&lock);
    if (real == NULL) {
        const char *path = getenv("SVMM_PINGUARD_MODULE");
        CK_C_GetFunctionList get;
        if (path == NULL || *path == '\0')
            path = DEFAULT_MODULE;
        real_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        get = real_handle ? (CK_C_GetFunctionList)dlsym(real_handle, "C_GetFunctionList")
                          : NULL;
        if (get == NULL || get(&real) != CKR_OK || real == NULL) {
            fprintf(stderr, "pinguard: cannot load %s: %s\n", path,
                    real_handle ? "no usable C_GetFunctionList" : dlerror());
            if (real_handle)
                dlclose(real_handle);
            real_handle = NULL;
            real = NULL;
            rv = CKR_GENERAL_ERROR;
        } else {
            guard = *real;
            guard.C_GetFunctionList = C_GetFunctionList;
            guard.C_Initialize = locked_Initialize;
            guard.C_Finalize = locked_Finalize;
            guard.C_GetSlotList = locked_GetSlotList;
            guard.C_GetSlotInfo = locked_GetSlotInfo;
            guard.C_GetTokenInfo = locked_GetTokenInfo;
            guard.C_GetMechanismList = locked_GetMechanismList;
            guard.C_OpenSession = locked_OpenSession;
            guard.C_CloseSession = locked_CloseSession;
            guard.C_Login = locked_Login;
            guard.C_Logout = locked_Logout;
            guard.C_FindObjectsInit = locked_FindObjectsInit;
            guard.C_FindObjects = locked_FindObjects;
            guard.C_FindObjectsFinal = locked_FindObjectsFinal;
            guard.C_GetAttributeValue = locked_GetAttributeValue;
            guard.C_SignInit = locked_SignInit;
            guard.C_Sign = locked_Sign;
            guard.C_DecryptInit = locked_DecryptInit;
            guard.C_Decrypt = locked_Decrypt;
            guard.C_DeriveKey = locked_DeriveKey;
        }
    }
    if (rv == CKR_OK)
        *out = &guard;
    pthread_mutex_unlock(&lock);
    return rv;
}

__attribute__((destructor)) static void pinguard_unload(void)
{
    if (real_handle != NULL)
        dlclose(real_handle);
    real_handle = NULL;
    real = NULL;
}
