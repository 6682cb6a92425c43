/*
 * A PAM application for the lab and the tests: like pamtester, but it reports what a test
 * needs to assert on -- the PAM code of each step, every message the modules showed, and the
 * PAM_USER the stack ended with -- as one JSON object on stdout.
 *
 *   svmm-pamclient SERVICE USER < pin      (USER "" leaves PAM_USER for the modules to set)
 *
 * Run it with pam_wrapper preloaded so it reads the lab's service files. The answer to every
 * echo-off prompt is the first line of stdin; it is never printed. (python-pam cannot host
 * pam_python modules: two Python runtimes in one process crash, so the client is C.)
 */
#include <security/pam_appl.h>
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

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SERVICE USER < pin\n", argv[0]);
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
    const void *item = NULL;
    const char *final_user = "";
    if (pam_get_item(h, PAM_USER, &item) == PAM_SUCCESS && item) final_user = item;
    char tail[96];
    snprintf(tail, sizeof(tail), "],\"step\":\"%s\",\"code\":%d,\"reason\":", step, rc);
    add("%s", tail);
    add_json_string(pam_strerror(h, rc));
    add("%s", ",\"user\":");
    add_json_string(final_user);
    add("%s", "}");
    fflush(stdout);
    printf("\n%s\n", report);
    pam_end(h, rc);
    return 0;
}
