#!/usr/bin/env bash
# Provision a Debian 12 host with pam_svmm the way an organisation rolls it out, with a demo
# organisation (CA, OCSP/CRL, directory, soft cards, an encrypted VM volume) to log in with.
#
#   vagrant/provision.sh                       everything, then start the services (Vagrant)
#   vagrant/provision.sh --phase P [...]       only these phases, in the order given:
#       packages   the product's Debian dependencies (apt)
#       product    the Debian package, as README says: apt install ./pam-svmm_*.deb (--deb
#                  FILE, else the newest in SRC/dist/, which `tools/run deb` builds)
#       demo       the demo organisation in /var/lib/svmm/demo and /etc/svmm/svmm.toml (the
#                  edit README asks for), the demo lab beside the package (svmm-lab)
#       system     what README leaves to the site: nsswitch (extrausers), the NSS timer, a
#                  sudoers rule for the engineering role, pam-auth-update --enable svmm
#       guest      the offline test guest's own bits (serial getty, a root shell on ttyS1)
#       tests      the test guest's test runner: /opt/svmm-e2e/test-venv, pam_wrapper (the
#                  device-mapper tests run in the guest; tools/run e2e)
#   vagrant/provision.sh --deb FILE ...        the package to install (product phase)
#   vagrant/provision.sh --no-start ...        do not start services (a chroot, an image)
#   vagrant/provision.sh --src DIR ...         the repository is DIR (Vagrant copies this
#                                              script alone to the box; default: ..)
#   vagrant/provision.sh --build-guest DIR     build the offline test guest, cached in DIR
#                                              (vagrant/guest.py; tools/run e2e boots it)
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEST_VENV=/opt/svmm-e2e/test-venv
# The demo lab is no part of the package (its venv never has it): it runs from the source
# tree, by the package's Python, with only svmm_lab on PYTHONPATH (a link to SRC/svmm_lab,
# which finds config/ beside it); svmm-lab is `svmm lab` with it.
LAB_PATH=/usr/local/lib/svmm-lab
DEB=
DEMO=/var/lib/svmm/demo
CONFIG=/etc/svmm/svmm.toml

# The product's Debian dependencies (tools/run DEBIAN_PACKAGES, minus the test-only ones)
# and what a host needs around them. tests/unit/test_provision.py keeps the two in step.
PACKAGES=(
  python3 python3-venv openssl ca-certificates
  libpam-python pamtester
  softhsm2 opensc p11-kit p11-kit-modules libp11-kit-dev libpam0g-dev gcc libc6-dev
  libengine-pkcs11-openssl iproute2
  libnss-extrausers util-linux
  slapd ldap-utils
  cryptsetup-bin cryptsetup qemu-system-x86 qemu-utils
  libpam-runtime libpam-systemd sudo login passwd kmod
  rsyslog rsyslog-gnutls
)

say() { printf '[provision] %s\n' "$*"; }

phase_packages() {
  say "Debian packages: ${PACKAGES[*]}"
  apt-get update -q
  # The demo runs its own slapd (lab folder, loopback); the package must not set one up.
  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

phase_product() {
  local deb=$DEB f
  if [ -z "$deb" ]; then
    for f in "$SRC"/dist/pam-svmm_*.deb; do
      if [ -e "$f" ] && { [ -z "$deb" ] || [ "$f" -nt "$deb" ]; }; then deb=$f; fi
    done
  fi
  if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "provision.sh: no package: build it with tools/run deb (dist/), or give --deb FILE" >&2
    exit 2
  fi
  deb=$(realpath "$deb")
  say "product: apt install $deb"
  # As README says: the package's venv, shim, units (svmmd.socket enabled), tmpfiles, the
  # seal key and the pam-auth-update profile (registered, not enabled).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb"
}

phase_system() {
  say "system: nsswitch (extrausers), the NSS timer, sudoers, pam-auth-update --enable svmm"
  # The identity bridge after the local files (local accounts always win).
  sed -i -E \
    -e '/^(passwd|group):/{/extrausers/!s/$/ extrausers/}' /etc/nsswitch.conf
  install -d -m 0755 /var/lib/extrausers
  # No VM account: svmmd runs every VM's QEMU as a uid of its own ([launcher] vm_uid_min..max).
  # sudo for one role: the directory's engineering group (a POSIX group through the bridge,
  # and a role of its members), authenticated with the card through PAM.
  install -m 0440 /dev/stdin /etc/sudoers.d/svmm-engineering <<'EOF'
# pam_svmm: members of the engineering role may use sudo (with their card and PIN).
%engineering ALL=(ALL:ALL) ALL
EOF
  visudo -cq
  systemctl enable svmm-nss-sync.timer >/dev/null 2>&1 || true
  # Last, once the configuration is in place (README: after `svmm doctor`, which needs the
  # demo organisation's services running; the e2e guest checks the logins themselves).
  pam-auth-update --enable svmm
}

phase_demo() {
  say "demo organisation in $DEMO, configuration $CONFIG"
  # The lab builds the organisation from the repository (config/ldap, config/policy, the
  # card interposer's C source), so it runs from the source tree; the product it runs with
  # and configures is the package's (/usr/bin/svmm, /opt/svmm/venv).
  install -d "$LAB_PATH"
  ln -sfn "$SRC/svmm_lab" "$LAB_PATH/svmm_lab"
  install -m 0755 /dev/stdin /usr/local/bin/svmm-lab <<EOF
#!/bin/sh
# svmm lab, with the demo lab from $SRC (vagrant/provision.sh; not in the package)
PYTHONPATH=$LAB_PATH exec /usr/bin/svmm lab "\$@"
EOF
  /usr/local/bin/svmm-lab provision --dir "$DEMO" --config-out "$CONFIG" --reader alice
  install -m 0644 "$SRC/config/systemd/svmm-demo-org.service" /etc/systemd/system/
  install -d /etc/systemd/system/svmm-demo-org.service.d
  cat > /etc/systemd/system/svmm-demo-org.service.d/lab.conf <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/local/bin/svmm-lab serve --dir /var/lib/svmm/demo --directory
EOF
  # The account sync waits for the demo directory and also runs at boot.
  install -d /etc/systemd/system/svmm-nss-sync.service.d
  cat > /etc/systemd/system/svmm-nss-sync.service.d/demo.conf <<'EOF'
[Unit]
Wants=svmm-demo-org.service
After=svmm-demo-org.service
EOF
  systemctl enable svmm-demo-org.service >/dev/null 2>&1 || true
  demo_audit_collector
  # The Debian slapd service is not configured (the demo runs its own): keep it off.
  systemctl disable slapd.service >/dev/null 2>&1 || true
  install -d /etc/systemd/system/multi-user.target.wants
  ln -sf /lib/systemd/system/svmm-nss-sync.service \
    /etc/systemd/system/multi-user.target.wants/svmm-nss-sync.service
}

# The audit trail leaves the host: rsyslog forwards every record (config/rsyslog/
# svmm-audit-forward.conf, as an organisation would install it) over TLS to a collector. The
# demo's collector is a second rsyslogd on 127.0.0.1:6514; a small CA made here signs its
# certificate and the host's (x509/name authentication both ways).
demo_audit_collector() {
  local ca=/etc/svmm-collector host=/etc/svmm/rsyslog
  install -d -m 0700 "$ca" "$host" /var/spool/svmm-collector /var/log/svmm-collector
  if [ ! -e "$ca/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj "/CN=svmm demo syslog CA" -keyout "$ca/ca.key" -out "$ca/ca.pem" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
      2>/dev/null
    local name dir
    for name in collector host; do
      dir=$ca
      [ "$name" = host ] && dir=$host
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=svmm-$name" \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
      printf 'subjectAltName=DNS:svmm-%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$name" \
        > "$dir/$name.ext"
      openssl x509 -req -in "$dir/$name.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" \
        -CAcreateserial -days 3650 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
      rm -f "$dir/$name.csr" "$dir/$name.ext"
    done
    install -m 0644 "$ca/ca.pem" "$host/ca.pem"
  fi
  install -m 0600 "$SRC/config/rsyslog/svmm-collector.conf" "$ca/rsyslog.conf"
  install -m 0644 "$SRC/config/systemd/svmm-collector.service" /etc/systemd/system/
  install -m 0644 "$SRC/config/rsyslog/svmm-audit-forward.conf" \
    /etc/rsyslog.d/60-svmm-audit-forward.conf
  systemctl enable svmm-collector.service rsyslog.service >/dev/null 2>&1 || true
}

phase_tests() {
  # The test guest only: the tests that need device-mapper run in it (tools/run e2e), with
  # their own venv so the product's stays as a host would have it. pam_wrapper is the lab's
  # PAM harness (its logins run against the lab's service files, not the system's).
  say "tests: $TEST_VENV (pytest and the product), the lab's PAM harness"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    libpam-wrapper libnss-wrapper lightdm pcscd libccid
  # A display manager's own PAM service (/etc/pam.d/lightdm), driven with pamtester: the
  # guest has no X server, so the greeter itself never starts (masked, not left failing).
  # pcscd and the CCID driver: the reader stack a USB card reader needs (QEMU's usb-ccid).
  systemctl mask lightdm.service >/dev/null 2>&1 || ln -sf /dev/null /etc/systemd/system/lightdm.service
  if [ ! -x "$TEST_VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$TEST_VENV"
  fi
  local build
  build=$(mktemp -d)
  cp -a "$SRC/pam_svmm" "$SRC/pyproject.toml" "$SRC/README.md" "$build/"
  "$TEST_VENV/bin/pip" install -q -c "$SRC/constraints.txt" "$build" pytest
  rm -rf "$build"
  "$TEST_VENV/bin/python" -m compileall -q "$TEST_VENV/lib" >/dev/null
}

phase_guest() {
  say "test guest: serial login on ttyS0, root shell on ttyS1, dm_crypt at boot"
  # alice's card for QEMU's emulated USB CCID reader: its keys go to an NSS database on the
  # host that runs the guest (vagrant/guest.py moves them out of the image), never stay here.
  /usr/local/bin/svmm-lab ccid-card --dir "$DEMO" --out /var/lib/svmm/ccid-card alice
  # QEMU's usb-ccid says it has a PIN pad (bPINSupport) but its emulated card cannot take
  # a PIN from one: OpenSC is told to ignore reader PIN pads, as sites do for such readers.
  cat > /etc/opensc/opensc.conf <<'EOF'
app default {
	reader_driver pcsc {
		enable_pinpad = false;
	}
	framework pkcs15 {
	}
}
EOF
  echo svmm-guest > /etc/hostname
  printf '127.0.0.1 localhost\n127.0.1.1 svmm-guest\n' > /etc/hosts
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > /etc/fstab
  printf "dm_mod\ndm_crypt\nloop\n" > /etc/modules-load.d/svmm-dm-crypt.conf
  # Root has no password: the only root access is the control port (ttyS1).
  passwd -d root >/dev/null
  passwd -l root >/dev/null
  install -d /etc/systemd/system/getty.target.wants
  ln -sf /lib/systemd/system/serial-getty@.service \
    /etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service
  cat > /etc/systemd/system/svmm-e2e-control.service <<'EOF'
[Unit]
Description=e2e control port: a root shell on ttyS1 (test guest only)
After=systemd-user-sessions.service

[Service]
ExecStart=/bin/bash --noprofile --norc -i
StandardInput=tty
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS1
TTYReset=yes
Environment=TERM=dumb HOME=/root
Restart=always

[Install]
WantedBy=multi-user.target
EOF
  systemctl enable svmm-e2e-control.service >/dev/null 2>&1 || true
  systemctl mask serial-getty@ttyS1.service >/dev/null 2>&1 || true
  # No network in the offline guest: do not wait for it.
  systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
}

start_services() {
  say "starting services"
  systemctl daemon-reload
  systemctl restart svmm-demo-org.service
  systemctl start svmm-nss-sync.service
  systemctl enable --now svmmd.socket svmm-nss-sync.timer
}

phases=()
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) phases+=("$2"); shift 2 ;;
    --no-start) start=0; shift ;;
    --src) SRC=$(cd "$2" && pwd); shift 2 ;;
    --deb) DEB=$2; shift 2 ;;
    --build-guest)
      exec /usr/bin/python3 "$SRC/vagrant/guest.py" build --cache "$2" ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "provision.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh: run as root" >&2
  exit 2
fi
if [ ${#phases[@]} -eq 0 ]; then
  phases=(packages product demo system)
fi
for p in "${phases[@]}"; do
  case "$p" in
    packages|product|system|demo|guest|tests) "phase_$p" ;;
    *) echo "provision.sh: unknown phase $p" >&2; exit 2 ;;
  esac
done
if [ "$start" -eq 1 ] && [[ " ${phases[*]} " == *" demo "* ]]; then
  start_services
fi
say "done: ${phases[*]}"
