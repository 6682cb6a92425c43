/*
 * A PAM application for the lab and the tests: like pamtester, but it reports what a test
 * needs to assert on -- the PAM code of each step, every message the modules showed, and the
 * PAM_USER the stack ended with -- as one JSON object on stdout.
 *
 *   svmm-pamclient SERVICE USER < pin      (USER "" leaves PAM_USER for the modules to set)
 *   svmm-pamclient SERVICE USER session < pin
 *   svmm-pamclient SERVICE USER pause < pin
 *
 * Session mode: after a successful setcred, pam_open_session, then a line {"session_open":N}
 * on stdout; the client then waits for a second line on stdin (or its end, or SIGTERM/SIGHUP)
 * before pam_close_session and pam_setcred(PAM_DELETE_CRED). The report carries both codes
 * ("session_open", "session_close"; -1 when the call was not made).
 *
 * Pause mode is session mode with a stop between the two halves of a login: after setcred a
 * line {"authenticated":N}, then a line on stdin before pam_open_session. Another PAM
 * application can act in that gap (the transaction is authenticated, its session not open).
 *
 * Run it with pam_wrapper preloaded so it reads the lab's service files. The answer to every
 * echo-off prompt is the first line of stdin; it is never printed. (python-pam cannot host
 * pam_python modules: two Python runtimes in one process crash, so the client is C.)
 */
#include <security/pam_appl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char secret[512];

/* The report is built in memory and printed at the end on a line of its own, so that
 * anything a module prints to stdout cannot break it. */
static char report[65536];
static size_t used;

static void add(const char *fmt, const char *s) {
    if (used < sizeof(report)) used += (size_t)snprintf(report + used, sizeof(report) - used, fmt, s);
    if (used >= sizeof(report)) used = sizeof(report) - 1;
}

static void add_json_string(const char *s) {
    char one[8];
    add("%s", "\"");
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') snprintf(one, sizeof(one), "\\%c", c);
        else if (c < 0x20) snprintf(one, sizeof(one), "\\u%04x", c);
        else snprintf(one, sizeof(one), "%c", c);
        add("%s", one);
    }
    add("%s", "\"");
}

static int n_messages;

static int conv(int n, const struct pam_message **msg, struct pam_response **resp, void *data) {
    (void)data;
    struct pam_response *r = calloc((size_t)n, sizeof(*r));
    if (!r) return PAM_BUF_ERR;
    for (int i = 0; i < n; i++) {
        char style[32];
        snprintf(style, sizeof(style), "{\"style\":%d,\"text\":", msg[i]->msg_style);
        add("%s", n_messages++ ? "," : "");
        add("%s", style);
        add_json_string(msg[i]->msg);
        add("%s", "}");
        if (msg[i]->msg_style == PAM_PROMPT_ECHO_OFF || msg[i]->msg_style == PAM_PROMPT_ECHO_ON)
            r[i].resp = strdup(secret);
    }
    *resp = r;
    return PAM_SUCCESS;
}

static volatile sig_atomic_t stop_waiting;

static void on_signal(int sig) {
    (void)sig;
    stop_waiting = 1;
}

/* SIGTERM/SIGHUP end the session; no SA_RESTART, so a waiting fgets returns. Installed
 * before the session opens: a signal sent as soon as it is reported must not kill us. */
static void catch_end_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

/* Until a line on stdin, its end, or a signal. */
static void wait_for_end_of_session(void) {
    char line[64];
    while (!stop_waiting) {
        if (fgets(line, sizeof(line), stdin)) break;
        if (feof(stdin)) break;
        clearerr(stdin); /* interrupted: look at the flag again */
    }
}

int main(int argc, char **argv) {
    int pause = argc == 4 && strcmp(argv[3], "pause") == 0;
    int session = pause || (argc == 4 && strcmp(argv[3], "session") == 0);
    if (argc != 3 && !session) {
        fprintf(stderr, "usage: %s SERVICE USER [session|pause] < pin\n", argv[0]);
        return 2;
    }
    if (!fgets(secret, sizeof(secret), stdin)) secret[0] = '\0';
    secret[strcspn(secret, "\n")] = '\0';

    struct pam_conv c = {conv, NULL};
    pam_handle_t *h = NULL;
    const char *user = argv[2][0] ? argv[2] : NULL;
    int rc = pam_start(argv[1], user, &c, &h);
    if (rc != PAM_SUCCESS) {
        printf("{\"step\":\"start\",\"code\":%d,\"messages\":[],\"user\":\"\"}\n", rc);
        return 1;
    }
    const char *step = "authenticate";
    add("%s", "{\"messages\":[");
    rc = pam_authenticate(h, 0);
    if (rc == PAM_SUCCESS) { step = "acct_mgmt"; rc = pam_acct_mgmt(h, 0); }
    if (rc == PAM_SUCCESS) { step = "setcred"; rc = pam_setcred(h, PAM_ESTABLISH_CRED); }
    memset(secret, 0, sizeof(secret));
    int open_rc = -1, close_rc = -1;
    if (session && rc == PAM_SUCCESS) {
        catch_end_signals();
        if (pause) {
            printf("\n{\"authenticated\":%d}\n", rc);
            fflush(stdout);
            wait_for_end_of_session();
            stop_waiting = 0;
        }
        open_rc = pam_open_session(h, 0);
        printf("\n{\"session_open\":%d}\n", open_rc);
        fflush(stdout);
        if (open_rc == PAM_SUCCESS) {
            wait_for_end_of_session();
            close_rc = pam_close_session(h, 0);
        }
        pam_setcred(h, PAM_DELETE_CRED);
    }
    const void *item = NULL;
    const char *final_user = "";
    if (pam_get_item(h, PAM_USER, &item) == PAM_SUCCESS && item) final_user = item;
    char tail[96];
    snprintf(tail, sizeof(tail), "],\"step\":\"%s\",\"code\":%d,\"reason\":", step, rc);
    add("%s", tail);
    add_json_string(pam_strerror(h, rc));
    add("%s", ",\"user\":");
    add_json_string(final_user);
    char codes[80];
    snprintf(codes, sizeof(codes), ",\"session_open\":%d,\"session_close\":%d}", open_rc, close_rc);
    add("%s", codes);
    fflush(stdout);
    printf("\n%s\n", report);
    pam_end(h, rc);
    return 0;
}
