/* pamtimer: pamtester's job for the benchmarks, with the timestamps of the conversation.
 *
 *   pamtimer SERVICE USER OP... < pin        OP: authenticate acct_mgmt open_session
 *                                                close_session setcred
 *
 * Runs the PAM calls in order on one handle, like `pamtester SERVICE USER OP...`, and answers
 * every prompt with the first line of stdin (read when the first prompt comes). Exit 0 when
 * every call returned PAM_SUCCESS, else 1 with "pamtimer: <pam_strerror>" on stderr (the
 * messages the modules showed go to stderr too). On stdout, one JSON line of CLOCK_MONOTONIC
 * nanoseconds, the clock Python's time.monotonic_ns() reads, so the bench can put them on the
 * timeline of the process it spawned:
 *
 *   {"main": T, "events": [{"what": "prompt"|"info"|"error", "t": T},
 *                          {"what": "answered", "t": T},           (the PIN handed back)
 *                          {"what": "op", "op": "authenticate", "code": 0, "t": T}, ...],
 *    "end": T}
 *
 * A prompt's "t" is when the conversation function was called; "answered" is when it returns
 * with the PIN, i.e. when the module has the PIN: the post-PIN latency is the next "op"
 * minus the last "answered". (C, not Python: two Python runtimes in one process crash.)
 */
#include <security/pam_appl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_EVENTS 64

static char secret[256];
static int secret_read;
static char events[8192];
static size_t used;
static int n_events;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void event(const char *what, const char *op, int code, long long t) {
    if (n_events >= MAX_EVENTS || used >= sizeof(events) - 160) return;
    int n;
    if (op)
        n = snprintf(events + used, sizeof(events) - used,
                     "%s{\"what\":\"%s\",\"op\":\"%s\",\"code\":%d,\"t\":%lld}",
                     n_events ? "," : "", what, op, code, t);
    else
        n = snprintf(events + used, sizeof(events) - used, "%s{\"what\":\"%s\",\"t\":%lld}",
                     n_events ? "," : "", what, t);
    if (n > 0) used += (size_t)n;
    n_events++;
}

static int conv(int n, const struct pam_message **msg, struct pam_response **resp, void *data) {
    (void)data;
    struct pam_response *r = calloc((size_t)n, sizeof(*r));
    if (!r) return PAM_BUF_ERR;
    int answered = 0;
    for (int i = 0; i < n; i++) {
        int style = msg[i]->msg_style;
        int prompt = style == PAM_PROMPT_ECHO_OFF || style == PAM_PROMPT_ECHO_ON;
        event(prompt ? "prompt" : style == PAM_ERROR_MSG ? "error" : "info", NULL, 0, now_ns());
        if (!prompt) {
            fprintf(stderr, "%s\n", msg[i]->msg ? msg[i]->msg : "");
            continue;
        }
        if (!secret_read) {
            if (!fgets(secret, sizeof(secret), stdin)) secret[0] = '\0';
            secret[strcspn(secret, "\n")] = '\0';
            secret_read = 1;
        }
        r[i].resp = strdup(secret);
        answered = 1;
    }
    *resp = r;
    if (answered) event("answered", NULL, 0, now_ns());
    return PAM_SUCCESS;
}

int main(int argc, char **argv) {
    long long started = now_ns();
    if (argc < 4) {
        fprintf(stderr, "usage: %s SERVICE USER OP... < pin\n", argv[0]);
        return 2;
    }
    struct pam_conv c = {conv, NULL};
    pam_handle_t *h = NULL;
    int rc = pam_start(argv[1], argv[2], &c, &h);
    if (rc != PAM_SUCCESS) {
        fprintf(stderr, "pamtimer: pam_start: %d\n", rc);
        return 1;
    }
    for (int i = 3; i < argc && rc == PAM_SUCCESS; i++) {
        const char *op = argv[i];
        if (strcmp(op, "authenticate") == 0) rc = pam_authenticate(h, 0);
        else if (strcmp(op, "acct_mgmt") == 0) rc = pam_acct_mgmt(h, 0);
        else if (strcmp(op, "open_session") == 0) rc = pam_open_session(h, 0);
        else if (strcmp(op, "close_session") == 0) rc = pam_close_session(h, 0);
        else if (strcmp(op, "setcred") == 0) rc = pam_setcred(h, PAM_ESTABLISH_CRED);
        else {
            fprintf(stderr, "pamtimer: unknown operation %s\n", op);
            pam_end(h, PAM_SUCCESS);
            return 2;
        }
        event("op", op, rc, now_ns());
        if (rc != PAM_SUCCESS) fprintf(stderr, "pamtimer: %s\n", pam_strerror(h, rc));
    }
    memset(secret, 0, sizeof(secret));
    pam_end(h, rc);
    printf("{\"main\":%lld,\"events\":[%s],\"end\":%lld}\n", started, events, now_ns());
    return rc == PAM_SUCCESS ? 0 : 1;
}
