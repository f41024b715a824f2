import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  API_ACCESS_VOLUME_NAME, CREDENTIALS_DIR, SERVICE_ACCOUNT_TOKEN_DIR, DEFAULT_INJECTOR_SETTINGS, INJECTED_ANNOTATION, SIDECAR_CONTAINER_NAME, SOCKET_DIR, SOCKET_VOLUME_NAME,
  applyJsonPatch, computeInjection, findSidecar, escapePointerToken, kubeletsWithoutNativeSidecars, nativeSidecarsSupported, podNeedsRepair, pointer, poolSizeHint, quantityBytes, repairVerdict, resolveConsumer, sidecarNodeOptions,
  type ContainerLike, type EnvVar, type InjectableConnection, type InjectorSettings, type PodLike, type VolumeLike,
} from '../../src/core/inject/index.ts';

const settings: InjectorSettings = { ...DEFAULT_INJECTOR_SETTINGS, sidecarImage: 'poolkeeper/poolkeeper:test', version: '0.1.0' };

function connection(overrides: Partial<InjectableConnection['spec']> = {}, status?: InjectableConnection['status']): InjectableConnection {
  return {
    metadata: { name: 'orders-db', namespace: 'shop' },
    spec: {
      database: { host: 'db.internal', port: 5432, dbname: 'orders', credentialsSecretRef: { name: 'orders-creds' } },
      consumers: [{ name: 'web', workloadRef: { kind: 'Deployment', name: 'web' }, minPerPod: 4, processesPerPod: 2 }],
      sidecar: { port: 6432, drainTimeout: 30 },
      ...overrides,
    },
    ...(status ? { status } : {}),
  };
}

/** The ServiceAccount token mount Kubernetes adds to every container of a pod that gets a token. */
const TOKEN_MOUNT = { name: 'kube-api-access-7xk2p', mountPath: '/var/run/secrets/kubernetes.io/serviceaccount', readOnly: true };

function pod(overrides: { containers?: ContainerLike[]; initContainers?: ContainerLike[]; annotations?: Record<string, string>; labels?: Record<string, string> } = {}): PodLike {
  // As the ServiceAccount admission plugin leaves it, before webhooks run: the app container has the token.
  const spec: NonNullable<PodLike['spec']> = { containers: overrides.containers ?? [{ name: 'app', image: 'app:1', volumeMounts: [TOKEN_MOUNT] }] };
  if (overrides.initContainers) spec.initContainers = overrides.initContainers;
  return {
    metadata: {
      generateName: 'web-5d8f7-',
      namespace: 'shop',
      labels: overrides.labels ?? { 'poolkeeper.dev/connection': 'orders-db', app: 'web', 'pod-template-hash': '5d8f7' },
      ...(overrides.annotations ? { annotations: overrides.annotations } : {}),
      ownerReferences: [{ apiVersion: 'apps/v1', kind: 'ReplicaSet', name: 'web-5d8f7', controller: true }],
    },
    spec,
  };
}

function mountsOf(c: ContainerLike | undefined): { name: string; mountPath: string; readOnly?: boolean }[] {
  return (c?.volumeMounts ?? []) as { name: string; mountPath: string; readOnly?: boolean }[];
}

function injected(p: PodLike, c = connection(), s = settings): PodLike {
  const result = computeInjection({ pod: p, connection: c, settings: s });
  assert.deepEqual(result.errors, []);
  return applyJsonPatch(p, result.patch);
}

function envOf(container: ContainerLike | undefined): Record<string, EnvVar> {
  return Object.fromEntries((container?.env ?? []).map((e) => [e.name, e]));
}

describe('inject: computeInjection', function () {
  it('skips pods without the opt-in label and pods that opt out', function () {
    assert.deepEqual(computeInjection({ pod: pod({ labels: { app: 'web' } }), connection: connection(), settings }), { skipped: 'NotOptedIn', patch: [], warnings: [], errors: [] });
    const optedOut = computeInjection({ pod: pod({ annotations: { 'poolkeeper.dev/inject': 'false' } }), connection: connection(), settings });
    assert.equal(optedOut.skipped, 'OptedOut');
    assert.deepEqual(optedOut.patch, []);
  });

  it('adds a native sidecar, its secret volumes, app env, annotations and grace period to a bare pod', function () {
    const result = computeInjection({ pod: pod(), connection: connection(), settings });
    assert.deepEqual(result.errors, []);
    assert.equal(result.consumer, 'web');
    // Arrays and maps that do not exist yet are created whole, not appended to.
    assert.ok(result.patch.some((op) => op.op === 'add' && op.path === '/spec/initContainers'));
    assert.ok(result.patch.some((op) => op.op === 'add' && op.path === '/metadata/annotations'));
    assert.ok(result.patch.some((op) => op.op === 'add' && op.path === '/spec/containers/0/env'));
    const out = applyJsonPatch(pod(), result.patch);
    const sidecar = out.spec!.initContainers![0]!;
    assert.equal(sidecar.name, SIDECAR_CONTAINER_NAME);
    assert.equal(sidecar.restartPolicy, 'Always');
    assert.deepEqual(sidecar.args, ['sidecar']);
    const sidecarEnv = envOf(sidecar);
    assert.deepEqual(sidecarEnv.POOLKEEPER_POD_NAME?.valueFrom, { fieldRef: { fieldPath: 'metadata.name' } });
    assert.deepEqual(sidecarEnv.POOLKEEPER_POD_NAMESPACE?.valueFrom, { fieldRef: { fieldPath: 'metadata.namespace' } });
    assert.equal(sidecarEnv.POOLKEEPER_CONNECTION?.value, 'orders-db');
    assert.equal(sidecarEnv.POOLKEEPER_LISTEN_PORT?.value, '6432');
    assert.equal(sidecarEnv.POOLKEEPER_ADMIN_PORT?.value, String(settings.adminPort));
    assert.equal(sidecarEnv.POOLKEEPER_CREDENTIALS_DIR?.value, CREDENTIALS_DIR);
    assert.equal(sidecarEnv.POOLKEEPER_SSH_KEY_DIR, undefined);
    assert.deepEqual(sidecar.securityContext, {
      runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false,
      capabilities: { drop: ['ALL'] }, seccompProfile: { type: 'RuntimeDefault' },
    });
    for (const probe of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
      assert.equal((sidecar[probe] as { httpGet: { port: string } }).httpGet.port, 'pk-admin');
    }
    assert.deepEqual(sidecar.resources, { requests: { cpu: '50m', memory: '64Mi' }, limits: { memory: '128Mi' } });
    assert.deepEqual(out.spec!.volumes, [{
      name: 'poolkeeper-credentials',
      secret: { secretName: 'orders-creds', items: [{ key: 'username', path: 'username' }, { key: 'password', path: 'password' }], defaultMode: 0o444 },
    }, {
      // The sidecar's own state, kept across its restarts: the backends it holds.
      name: 'poolkeeper-state', emptyDir: { medium: 'Memory', sizeLimit: '1Mi' },
    }]);
    // The credentials and the state are mounted into the sidecar only.
    assert.deepEqual(sidecar.volumeMounts, [{ name: 'poolkeeper-credentials', mountPath: CREDENTIALS_DIR, readOnly: true }, { name: 'poolkeeper-state', mountPath: '/var/run/poolkeeper/state', readOnly: false }]);
    assert.equal(envOf(sidecar).POOLKEEPER_STATE_DIR?.value, '/var/run/poolkeeper/state');
    // A small young generation, and an old space V8 collects before the container's 128Mi: garbage must not grow the sidecar past its memory limit.
    assert.equal(envOf(sidecar).NODE_OPTIONS?.value, '--max-semi-space-size=2 --max-old-space-size=76');
    assert.deepEqual(out.spec!.containers[0]!.volumeMounts, [TOKEN_MOUNT], 'the app container gains no mount');
    const appEnv = envOf(out.spec!.containers[0]);
    assert.equal(appEnv.PGHOST?.value, '127.0.0.1');
    assert.equal(appEnv.PGPORT?.value, '6432');
    assert.equal(appEnv.PGDATABASE?.value, 'orders');
    assert.deepEqual(appEnv.PGUSER?.valueFrom, { secretKeyRef: { name: 'orders-creds', key: 'username' } });
    assert.equal(appEnv.PGSSLMODE?.value, 'disable');
    assert.equal(appEnv.DATABASE_URL?.value, 'postgresql://$(PGUSER)@127.0.0.1:6432/orders');
    assert.equal(appEnv.POOLKEEPER_POOL_SIZE?.value, '2');
    // PGUSER precedes DATABASE_URL so that the kubelet can expand $(PGUSER).
    const names = out.spec!.containers[0]!.env!.map((e) => e.name);
    assert.ok(names.indexOf('PGUSER') < names.indexOf('DATABASE_URL'));
    assert.equal(out.spec!.terminationGracePeriodSeconds, 35);
    assert.equal(out.metadata!.annotations![INJECTED_ANNOTATION], '0.1.0');
    assert.equal(out.metadata!.annotations!['poolkeeper.dev/sidecar-reads-tables'], 'true', 'its PoolMember starts on the grant table');
    assert.equal(out.metadata!.annotations!['poolkeeper.dev/consumer'], 'web');
    assert.equal(out.metadata!.labels!['poolkeeper.dev/connection'], 'orders-db');
  });

  describe('ServiceAccount token', function () {
    const tokenVolume = (p: PodLike): VolumeLike | undefined => p.spec!.volumes?.find((v) => v.name === API_ACCESS_VOLUME_NAME);
    const sidecarTokenMount = (p: PodLike): unknown => mountsOf(findSidecar(p)!.container).find((m) => m.mountPath === SERVICE_ACCOUNT_TOKEN_DIR);

    it('adds nothing when Kubernetes mounts a token (it mounts one into the sidecar too)', function () {
      const out = injected(pod());
      assert.equal(tokenVolume(out), undefined);
      assert.equal(sidecarTokenMount(out), undefined);
    });

    it('mounts a projected token, the cluster CA and the namespace into the sidecar only when the pod gets no token', function () {
      const noAutomount = pod({ containers: [{ name: 'app', image: 'app:1' }] });
      noAutomount.spec!.automountServiceAccountToken = false;
      // Off on the ServiceAccount instead: the pod says nothing, and no container has the token.
      const offOnAccount = pod({ containers: [{ name: 'app', image: 'app:1' }] });
      for (const p of [noAutomount, offOnAccount]) {
        const out = injected(p);
        assert.deepEqual(tokenVolume(out), {
          name: API_ACCESS_VOLUME_NAME,
          projected: {
            defaultMode: 0o444,
            sources: [
              { serviceAccountToken: { expirationSeconds: 3607, path: 'token' } },
              { configMap: { name: 'kube-root-ca.crt', items: [{ key: 'ca.crt', path: 'ca.crt' }] } },
              { downwardAPI: { items: [{ path: 'namespace', fieldRef: { apiVersion: 'v1', fieldPath: 'metadata.namespace' } }] } },
            ],
          },
        });
        assert.deepEqual(sidecarTokenMount(out), { name: API_ACCESS_VOLUME_NAME, mountPath: SERVICE_ACCOUNT_TOKEN_DIR, readOnly: true });
        assert.equal(out.spec!.containers[0]!.volumeMounts, undefined, 'the app container stays without a token');
        // Injecting its own output again changes nothing, whichever way the token came.
        assert.deepEqual(computeInjection({ pod: out, connection: connection(), settings }).patch, []);
      }
    });

    it('a pod injected with Kubernetes\' token keeps it when re-admitted', function () {
      const out = injected(pod());
      // The ServiceAccount plugin, run again after the webhook, mounts the token into the sidecar as well.
      (findSidecar(out)!.container.volumeMounts as unknown[]).push(TOKEN_MOUNT);
      assert.deepEqual(computeInjection({ pod: out, connection: connection(), settings }).patch, []);
    });
  });

  it('mounts the SSH key into the sidecar only when a tunnel is set, under the key asked for', function () {
    const tunnel = { host: 'bastion', port: 22, user: 'tunnel', privateKeySecretRef: { name: 'bastion-key', key: 'id_ed25519' }, hostKey: 'ssh-ed25519 AAAA' };
    const out = injected(pod(), connection({ sshTunnel: tunnel }));
    const sidecar = out.spec!.initContainers![0]!;
    assert.equal(envOf(sidecar).POOLKEEPER_SSH_KEY_DIR?.value, '/var/run/poolkeeper/ssh');
    assert.deepEqual(out.spec!.volumes![1], { name: 'poolkeeper-ssh-key', secret: { secretName: 'bastion-key', items: [{ key: 'id_ed25519', path: 'ssh-privatekey' }], defaultMode: 0o444 } });
    assert.equal((sidecar.volumeMounts as unknown[]).length, 3);
  });

  it('uses the custom credential keys of the Secret', function () {
    const c = connection();
    c.spec.database.credentialsSecretRef = { name: 'creds', usernameKey: 'user', passwordKey: 'pass' };
    const out = injected(pod(), c);
    const volume = out.spec!.volumes![0] as unknown as { secret: { items: unknown[] } };
    assert.deepEqual(volume.secret.items, [{ key: 'user', path: 'username' }, { key: 'pass', path: 'password' }]);
    assert.deepEqual(envOf(out.spec!.containers[0]).PGUSER?.valueFrom, { secretKeyRef: { name: 'creds', key: 'user' } });
  });

  it('puts the sidecar first among existing init containers and gives regular ones the env', function () {
    const initContainers: ContainerLike[] = [{ name: 'migrate', image: 'm:1', env: [{ name: 'X', value: '1' }] }, { name: 'mesh', image: 'p:1', restartPolicy: 'Always' }];
    const out = injected(pod({ initContainers }));
    assert.deepEqual(out.spec!.initContainers!.map((c) => c.name), [SIDECAR_CONTAINER_NAME, 'migrate', 'mesh']);
    assert.equal(envOf(out.spec!.initContainers![1]).PGHOST?.value, '127.0.0.1');
    assert.equal(envOf(out.spec!.initContainers![1]).X?.value, '1');
    assert.equal(out.spec!.initContainers![2]!.env, undefined);
  });

  it('names the kubelets that cannot run native sidecars (before 1.29), as distributions spell their versions', function () {
    assert.deepEqual(kubeletsWithoutNativeSidecars(['v1.29.0', 'v1.28.5-eks-5e0fdde', 'v1.27.3+k3s1', 'v1.28.5-eks-5e0fdde', 'v1.31.1-gke.1146000', 'v2.0.0']), ['v1.27.3+k3s1', 'v1.28.5-eks-5e0fdde']);
    assert.deepEqual(kubeletsWithoutNativeSidecars([]), []);
  });

  it('appends a plain container when native sidecars are not supported', function () {
    const out = injected(pod({ containers: [{ name: 'a' }, { name: 'b' }] }), connection(), { ...settings, nativeSidecars: false });
    assert.deepEqual(out.spec!.containers.map((c) => c.name), ['a', 'b', SIDECAR_CONTAINER_NAME]);
    assert.equal(out.spec!.containers[2]!.restartPolicy, undefined);
    assert.equal(out.spec!.initContainers, undefined);
    assert.equal(envOf(out.spec!.containers[1]).PGPORT?.value, '6432');
    assert.equal(out.spec!.containers[2]!.env!.some((e) => e.name === 'PGHOST'), false);
  });

  it('puts back restartPolicy: Always that a later webhook (a Kubernetes client older than 1.28) removed from the native sidecar, saying so', function () {
    const once = injected(pod({ containers: [{ name: 'a' }], initContainers: [{ name: 'migrate' }] }), connection());
    const stripped = structuredClone(once);
    delete stripped.spec!.initContainers![0]!.restartPolicy;
    const result = computeInjection({ pod: stripped, connection: connection(), settings });
    assert.deepEqual(result.patch, [{ op: 'add', path: '/spec/initContainers/0/restartPolicy', value: 'Always' }]);
    assert.match(result.warnings.join('\n'), /another mutating webhook removed restartPolicy: Always from the poolkeeper sidecar/);
    assert.deepEqual(applyJsonPatch(stripped, result.patch), once);
    assert.deepEqual(computeInjection({ pod: once, connection: connection(), settings }).patch, [], 'nothing to put back when it is there');
  });

  it('names no UID for a platform that assigns one (OpenShift\'s restricted SCCs), and still asks for a non-root user', function () {
    const out = injected(pod({ containers: [{ name: 'a' }] }), connection(), { ...settings, runAsUser: undefined });
    const sidecar = out.spec!.initContainers![0]!;
    assert.deepEqual(sidecar.securityContext, {
      runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] }, seccompProfile: { type: 'RuntimeDefault' },
    });
  });

  it('keeps env the user set and reports each conflict as a warning', function () {
    const containers: ContainerLike[] = [{ name: 'app', env: [{ name: 'PGHOST', value: 'db.example' }, { name: 'DATABASE_URL', value: 'postgres://x' }, { name: 'PGSSLMODE', value: 'disable' }] }];
    const result = computeInjection({ pod: pod({ containers }), connection: connection(), settings });
    const out = applyJsonPatch(pod({ containers }), result.patch);
    const env = envOf(out.spec!.containers[0]);
    assert.equal(env.PGHOST?.value, 'db.example');
    assert.equal(env.DATABASE_URL?.value, 'postgres://x');
    assert.equal(out.spec!.containers[0]!.env!.filter((e) => e.name === 'PGHOST').length, 1);
    assert.equal(env.PGPORT?.value, '6432');
    // Same value as ours is not a conflict.
    assert.equal(result.warnings.filter((w) => /kept its own/.test(w)).length, 2);
    assert.ok(result.warnings.some((w) => w.includes('PGHOST')));
    assert.ok(result.warnings.some((w) => w.includes('DATABASE_URL')));
  });

  it('warns that envFrom keys are overridden', function () {
    const result = computeInjection({ pod: pod({ containers: [{ name: 'app', envFrom: [{ configMapRef: { name: 'cfg' } }] }] }), connection: connection(), settings });
    assert.ok(result.warnings.some((w) => /envFrom/.test(w)));
  });

  it('collects every port conflict as a coded error and returns no patch', function () {
    const containers: ContainerLike[] = [
      { name: 'app', ports: [{ containerPort: 6432 }, { containerPort: settings.adminPort, name: 'metrics' }] },
      { name: 'other', ports: [{ containerPort: 8080, name: 'pk-admin' }] },
    ];
    const result = computeInjection({ pod: pod({ containers }), connection: connection(), settings });
    assert.deepEqual(result.patch, []);
    assert.deepEqual(result.errors.map((e) => e.code), ['PortConflict', 'PortConflict', 'PortNameConflict']);
    assert.match(result.errors[0]!.message, /app.*6432.*listen/);
    const udp = computeInjection({ pod: pod({ containers: [{ name: 'dns', ports: [{ containerPort: 6432, protocol: 'UDP' }] }] }), connection: connection(), settings });
    assert.deepEqual(udp.errors, []);
  });

  it('reports a volume name clash and an invalid connection together', function () {
    const p = pod();
    p.spec!.volumes = [{ name: 'poolkeeper-credentials', emptyDir: {} }];
    const clash = computeInjection({ pod: p, connection: connection(), settings });
    assert.deepEqual(clash.errors.map((e) => e.code), ['VolumeConflict']);
    const bad = connection({ sidecar: { port: settings.adminPort, drainTimeout: -1 } });
    bad.spec.database.dbname = '';
    const codes = computeInjection({ pod: pod(), connection: bad, settings }).errors.map((e) => e.code);
    assert.deepEqual(codes, ['InvalidConnection', 'PortConflict', 'InvalidConnection']);
  });

  it('tells the sidecar to accept TLS from apps only with clientTLS SelfSigned, and rejects other values', function () {
    const sidecarEnv = (c: InjectableConnection): Record<string, EnvVar> => envOf(findSidecar(injected(pod(), c))?.container);
    assert.equal(sidecarEnv(connection()).POOLKEEPER_CLIENT_TLS, undefined);
    assert.equal(sidecarEnv(connection({ sidecar: { clientTLS: 'Disabled' } })).POOLKEEPER_CLIENT_TLS, undefined);
    assert.deepEqual(sidecarEnv(connection({ sidecar: { clientTLS: 'SelfSigned' } })).POOLKEEPER_CLIENT_TLS, { name: 'POOLKEEPER_CLIENT_TLS', value: 'self-signed' });
    // Apps keep PGSSLMODE=disable: only those that insist on TLS use it.
    const app = injected(pod(), connection({ sidecar: { clientTLS: 'SelfSigned' } })).spec!.containers.find((c) => c.name === 'app');
    assert.equal(envOf(app).PGSSLMODE?.value, 'disable');
    const errors = computeInjection({ pod: pod(), connection: connection({ sidecar: { clientTLS: 'Required' } }), settings }).errors;
    assert.deepEqual(errors.map((e) => e.message), ['spec.sidecar.clientTLS Required is not Disabled or SelfSigned']);
  });

  it('leaves a long enough grace period alone and raises a short one', function () {
    const long = pod();
    long.spec!.terminationGracePeriodSeconds = 120;
    assert.equal(injected(long).spec!.terminationGracePeriodSeconds, 120);
    const short = pod();
    short.spec!.terminationGracePeriodSeconds = 10;
    assert.equal(injected(short, connection({ sidecar: { port: 6432, drainTimeout: 60 } })).spec!.terminationGracePeriodSeconds, 65);
  });

  it('escapes ~ and / in annotation keys it adds next to existing ones', function () {
    const out = computeInjection({ pod: pod({ annotations: { 'a~b/c': 'x' } }), connection: connection(), settings });
    assert.ok(out.patch.some((op) => op.path === '/metadata/annotations/poolkeeper.dev~1injected'));
    assert.equal(escapePointerToken('a~b/c'), 'a~0b~1c');
    assert.equal(pointer('metadata', 'annotations', '~/'), '/metadata/annotations/~0~1');
  });

  it('gives an already injected pod an empty patch and no warnings', function () {
    const containers: ContainerLike[] = [{ name: 'app', env: [{ name: 'PGHOST', value: 'elsewhere' }] }];
    const once = injected(pod({ containers }));
    const again = computeInjection({ pod: once, connection: connection(), settings });
    assert.deepEqual(again, { patch: [], warnings: [], errors: [], consumer: 'web' });
  });

  it('on reinvocation fills in only a container that another webhook added', function () {
    const once = injected(pod());
    once.spec!.containers.push({ name: 'late', image: 'l:1' });
    const again = computeInjection({ pod: once, connection: connection(), settings });
    assert.ok(again.patch.every((op) => op.path.startsWith('/spec/containers/1/env')), JSON.stringify(again.patch));
    assert.ok(again.patch.length > 0);
  });

  describe('Unix-domain socket', function () {
    const socketSettings: InjectorSettings = { ...settings, unixSocket: true };

    it('shares an emptyDir: the sidecar listens in it, app and init containers get it as PGHOST and in DATABASE_URL', function () {
      const init: ContainerLike = { name: 'migrate', image: 'm:1', volumeMounts: [{ name: 'data', mountPath: '/data' }] };
      const out = injected(pod({ initContainers: [init] }), connection(), socketSettings);
      assert.deepEqual(out.spec!.volumes!.find((v) => v.name === SOCKET_VOLUME_NAME), { name: SOCKET_VOLUME_NAME, emptyDir: {} });
      const sidecar = out.spec!.initContainers!.find((c) => c.name === SIDECAR_CONTAINER_NAME);
      assert.equal(envOf(sidecar).POOLKEEPER_LISTEN_SOCKET_DIR?.value, SOCKET_DIR);
      assert.deepEqual(mountsOf(sidecar).find((m) => m.name === SOCKET_VOLUME_NAME), { name: SOCKET_VOLUME_NAME, mountPath: SOCKET_DIR, readOnly: false });
      for (const app of [out.spec!.containers[0], out.spec!.initContainers!.find((c) => c.name === 'migrate')]) {
        assert.equal(envOf(app).PGHOST?.value, SOCKET_DIR);
        assert.equal(envOf(app).PGPORT?.value, '6432');
        assert.equal(envOf(app).DATABASE_URL?.value, `postgresql://$(PGUSER)@/orders?host=${SOCKET_DIR}&port=6432`);
        assert.deepEqual(mountsOf(app).find((m) => m.name === SOCKET_VOLUME_NAME), { name: SOCKET_VOLUME_NAME, mountPath: SOCKET_DIR });
      }
      // The init container's own mount stays.
      assert.ok(mountsOf(out.spec!.initContainers!.find((c) => c.name === 'migrate')).some((m) => m.name === 'data'));
      assert.deepEqual(computeInjection({ pod: out, connection: connection(), settings: socketSettings }).patch, []);
    });

    it('follows the pod annotation over the injector setting, both ways', function () {
      const off = injected(pod({ annotations: { 'poolkeeper.dev/unix-socket': 'false' } }), connection(), socketSettings);
      assert.equal(envOf(off.spec!.containers[0]).PGHOST?.value, '127.0.0.1');
      assert.equal(off.spec!.volumes!.some((v) => v.name === SOCKET_VOLUME_NAME), false);
      assert.deepEqual(mountsOf(off.spec!.containers[0]), [TOKEN_MOUNT]);
      const on = injected(pod({ annotations: { 'poolkeeper.dev/unix-socket': 'true' } }));
      assert.equal(envOf(on.spec!.containers[0]).PGHOST?.value, SOCKET_DIR);
    });

    it('mounts the socket into a container another webhook added later; a pod injected without it stays on TCP', function () {
      const once = injected(pod(), connection(), socketSettings);
      once.spec!.containers.push({ name: 'late', image: 'l:1' });
      const again = computeInjection({ pod: once, connection: connection(), settings: socketSettings });
      assert.ok(again.patch.some((op) => op.path === '/spec/containers/1/volumeMounts'), JSON.stringify(again.patch));
      assert.equal(envOf(applyJsonPatch(once, again.patch).spec!.containers[1]).PGHOST?.value, SOCKET_DIR);
      // Injected over TCP before the setting was turned on: the pod cannot gain the volume, so nothing points at a socket.
      const tcp = injected(pod());
      tcp.spec!.containers.push({ name: 'late', image: 'l:1' });
      const late = applyJsonPatch(tcp, computeInjection({ pod: tcp, connection: connection(), settings: socketSettings }).patch);
      assert.equal(envOf(late.spec!.containers[1]).PGHOST?.value, '127.0.0.1');
      assert.equal(mountsOf(late.spec!.containers[1]).length, 0);
    });

    it('reports a clash on the volume name, and leaves a container that mounts something else at the socket path on TCP with a warning', function () {
      const clash = pod();
      clash.spec!.volumes = [{ name: SOCKET_VOLUME_NAME, emptyDir: {} }];
      assert.deepEqual(computeInjection({ pod: clash, connection: connection(), settings: socketSettings }).errors.map((e) => e.code), ['VolumeConflict']);
      const busyPod = pod({ containers: [{ name: 'app', volumeMounts: [{ name: 'mine', mountPath: SOCKET_DIR }] }, { name: 'other' }] });
      const busy = computeInjection({ pod: busyPod, connection: connection(), settings: socketSettings });
      assert.ok(busy.warnings.some((w) => w.includes(SOCKET_DIR)), JSON.stringify(busy.warnings));
      const out = applyJsonPatch(busyPod, busy.patch);
      assert.equal(envOf(out.spec!.containers[0]).PGHOST?.value, '127.0.0.1');
      assert.deepEqual(mountsOf(out.spec!.containers[0]).map((m) => m.name), ['mine']);
      assert.equal(envOf(out.spec!.containers[1]).PGHOST?.value, SOCKET_DIR);
    });
  });

  it('is idempotent and keeps the user\'s containers and env for arbitrary pods (property)', function () {
    const envName = fc.constantFrom('PGHOST', 'PGPORT', 'PGUSER', 'DATABASE_URL', 'POOLKEEPER_POOL_SIZE', 'OTHER', 'X');
    const env = fc.uniqueArray(fc.record({ name: envName, value: fc.string({ maxLength: 5 }) }), { selector: (e) => e.name, maxLength: 4 });
    const ports = fc.array(fc.record({ containerPort: fc.constantFrom(80, 8080, 6432, 9436, 5000) }), { maxLength: 2 });
    const container = fc.record({ env: fc.option(env, { nil: undefined }), ports: fc.option(ports, { nil: undefined }), restartPolicy: fc.option(fc.constant('Always'), { nil: undefined }) });
    const arbitraryPod = fc.record({
      containers: fc.array(container, { minLength: 1, maxLength: 3 }),
      initContainers: fc.option(fc.array(container, { maxLength: 2 }), { nil: undefined }),
      annotations: fc.option(fc.dictionary(fc.string({ minLength: 1, maxLength: 6 }), fc.string({ maxLength: 4 }), { maxKeys: 3 }), { nil: undefined }),
      grace: fc.option(fc.nat(100), { nil: undefined }),
      native: fc.boolean(),
      tunnel: fc.boolean(),
    });
    fc.assert(fc.property(arbitraryPod, (a) => {
      const p = pod({
        containers: a.containers.map((c, i) => ({ name: `c${i}`, ...(c.env ? { env: c.env } : {}), ...(c.ports ? { ports: c.ports } : {}) })),
        ...(a.initContainers ? { initContainers: a.initContainers.map((c, i) => ({ name: `i${i}`, ...(c.env ? { env: c.env } : {}), ...(c.restartPolicy ? { restartPolicy: c.restartPolicy } : {}) })) } : {}),
        ...(a.annotations ? { annotations: a.annotations } : {}),
      });
      if (a.grace !== undefined) p.spec!.terminationGracePeriodSeconds = a.grace;
      const c = a.tunnel ? connection({ sshTunnel: { host: 'b', user: 'u', privateKeySecretRef: { name: 'k' }, hostKey: 'h' } }) : connection();
      const s = { ...settings, nativeSidecars: a.native };
      const first = computeInjection({ pod: p, connection: c, settings: s });
      const conflicting = a.containers.some((x) => x.ports?.some((port) => port.containerPort === 6432 || port.containerPort === 9436));
      if (conflicting) {
        assert.ok(first.errors.length > 0 && first.patch.length === 0);
        return;
      }
      const out = applyJsonPatch(p, first.patch);
      const second = computeInjection({ pod: out, connection: c, settings: s });
      assert.deepEqual(second.patch, []);
      assert.deepEqual(second.warnings.filter((w) => /kept its own/.test(w)), []);
      // Exactly one sidecar; every user env value survives.
      const all = [...(out.spec!.initContainers ?? []), ...out.spec!.containers];
      assert.equal(all.filter((x) => x.name === SIDECAR_CONTAINER_NAME).length, 1);
      for (const [i, original] of p.spec!.containers.entries()) {
        for (const variable of original.env ?? []) assert.deepEqual({ ...envOf(out.spec!.containers[i])[variable.name] }, { ...variable });
      }
      for (const [key, value] of Object.entries(a.annotations ?? {})) assert.equal(out.metadata!.annotations![key], value);
      assert.ok((out.spec!.terminationGracePeriodSeconds ?? 30) >= 35);
    }), { numRuns: 300 });
  });

  it('detects native sidecar support from the server version', function () {
    assert.equal(nativeSidecarsSupported({ major: '1', minor: '28' }), false);
    assert.equal(nativeSidecarsSupported({ major: '1', minor: '29+' }), true);
    assert.equal(nativeSidecarsSupported({ major: '1', minor: '36' }), true);
  });
});

describe('inject: the sidecar\'s heap follows its memory limit', function () {
  it('caps the old space at 60 % of the container\'s limit, in any quantity notation; bounds only the young generation without one', function () {
    assert.equal(quantityBytes('128Mi'), 128 * 1024 * 1024);
    assert.equal(quantityBytes('1G'), 1e9);
    assert.equal(quantityBytes('134217728'), 134217728);
    assert.equal(quantityBytes('0.5Gi'), 512 * 1024 * 1024);
    assert.equal(quantityBytes('lots'), undefined);
    assert.equal(sidecarNodeOptions('256Mi'), '--max-semi-space-size=2 --max-old-space-size=153');
    assert.equal(sidecarNodeOptions('1Gi'), '--max-semi-space-size=2 --max-old-space-size=614');
    assert.equal(sidecarNodeOptions('32Mi'), '--max-semi-space-size=2 --max-old-space-size=32', 'never below 32 MB');
    assert.equal(sidecarNodeOptions(undefined), '--max-semi-space-size=2');
    const roomy = computeInjection({ pod: { metadata: { name: 'p', labels: { 'poolkeeper.dev/connection': 'orders' } }, spec: { containers: [{ name: 'app', image: 'app' }] } }, connection: connection(), settings: { ...settings, resources: { requests: {}, limits: { memory: '512Mi' } } } });
    const patched = applyJsonPatch({ metadata: { name: 'p', labels: { 'poolkeeper.dev/connection': 'orders' } }, spec: { containers: [{ name: 'app', image: 'app' }] } }, roomy.patch);
    const env = (findSidecar(patched)?.container.env ?? []).find((e) => e.name === 'NODE_OPTIONS');
    assert.equal(env?.value, '--max-semi-space-size=2 --max-old-space-size=307');
  });
});

describe('inject: the sidecar\'s resources from the pod\'s annotations', function () {
  const annotated = (annotations: Record<string, string>): PodLike => ({ metadata: { name: 'p', labels: { 'poolkeeper.dev/connection': 'orders' }, annotations }, spec: { containers: [{ name: 'app', image: 'app' }] } });
  const sidecarOf = (pod: PodLike, result: ReturnType<typeof computeInjection>): ContainerLike | undefined => findSidecar(applyJsonPatch(pod, result.patch))?.container;

  it('replaces each of the injector\'s defaults by its annotation, and the heap cap follows the memory limit', function () {
    const pod = annotated({ 'poolkeeper.dev/sidecar-cpu-limit': '500m', 'poolkeeper.dev/sidecar-memory-limit': '256Mi', 'poolkeeper.dev/sidecar-cpu-request': '0.1' });
    const result = computeInjection({ pod, connection: connection(), settings });
    assert.deepEqual(result.errors, []);
    const sidecar = sidecarOf(pod, result);
    assert.deepEqual(sidecar?.resources, { requests: { cpu: '0.1', memory: '64Mi' }, limits: { cpu: '500m', memory: '256Mi' } });
    assert.equal(sidecar?.env?.find((e) => e.name === 'NODE_OPTIONS')?.value, '--max-semi-space-size=2 --max-old-space-size=153');
    // Without annotations: the injector's, and no CPU limit.
    const plain = annotated({});
    assert.deepEqual(sidecarOf(plain, computeInjection({ pod: plain, connection: connection(), settings }))?.resources, { requests: { cpu: '50m', memory: '64Mi' }, limits: { memory: '128Mi' } });
  });

  it('refuses a value that is not a quantity, or a request above its limit, naming the annotation', function () {
    const bad = computeInjection({ pod: annotated({ 'poolkeeper.dev/sidecar-memory-limit': '1 gig' }), connection: connection(), settings });
    assert.deepEqual(bad.patch, []);
    assert.deepEqual(bad.errors.map((e) => e.code), ['InvalidAnnotation']);
    assert.match(bad.errors[0]!.message, /annotation poolkeeper\.dev\/sidecar-memory-limit: "1 gig" is not a memory quantity/);
    const inverted = computeInjection({ pod: annotated({ 'poolkeeper.dev/sidecar-cpu-request': '2', 'poolkeeper.dev/sidecar-cpu-limit': '500m' }), connection: connection(), settings });
    assert.match(inverted.errors[0]?.message ?? '', /CPU request 2 is above its limit 500m/);
  });
});

describe('inject: consumers and the pool size hint', function () {
  it('matches a Deployment through its ReplicaSet, a StatefulSet directly, and label selectors', function () {
    const c = connection({
      consumers: [
        { name: 'web', workloadRef: { kind: 'Deployment', name: 'web' } },
        { name: 'db-workers', workloadRef: { kind: 'StatefulSet', name: 'workers' } },
        { name: 'jobs', selector: { matchLabels: { tier: 'batch' }, matchExpressions: [{ key: 'queue', operator: 'In', values: ['a', 'b'] }] } },
      ],
    });
    assert.equal(resolveConsumer(c, pod())?.name, 'web');
    const wrongHash = pod();
    wrongHash.metadata!.labels!['pod-template-hash'] = 'other';
    assert.equal(resolveConsumer(c, wrongHash), undefined);
    const sts = pod();
    sts.metadata!.ownerReferences = [{ kind: 'StatefulSet', name: 'workers', controller: true }];
    assert.equal(resolveConsumer(c, sts)?.name, 'db-workers');
    assert.equal(resolveConsumer(c, pod({ labels: { 'poolkeeper.dev/connection': 'orders-db', tier: 'batch', queue: 'b' } }))?.name, 'jobs');
    assert.equal(resolveConsumer(c, pod({ labels: { 'poolkeeper.dev/connection': 'orders-db', tier: 'batch', queue: 'c' } })), undefined);
  });

  it('uses the live perProcessBudget when the consumer has pods, else minPerPod over processes, never below 1', function () {
    const c = connection({}, { consumers: [{ name: 'web', pods: 4, perProcessBudget: 3 }] });
    assert.equal(poolSizeHint(c, c.spec.consumers[0]), 3);
    const empty = connection({}, { consumers: [{ name: 'web', pods: 0, perProcessBudget: 0 }] });
    assert.equal(poolSizeHint(empty, empty.spec.consumers[0]), 2, 'no pods yet: the status budget of 0 says nothing');
    assert.equal(poolSizeHint(connection(), connection().spec.consumers[0]), 2);
    assert.equal(poolSizeHint(connection({ consumers: [{ name: 'w', minPerPod: 0 }] }), { name: 'w', minPerPod: 0 }), 1);
    assert.equal(poolSizeHint(connection(), undefined), 1);
  });

  it('mounts the database CA from caSecretRef into the sidecar only, and tells it where', function () {
    const c = connection();
    c.spec.database.caSecretRef = { name: 'db-ca', key: 'root.pem' };
    const result = computeInjection({ pod: pod({ labels: { 'poolkeeper.dev/connection': 'orders-db' } }), connection: c, settings });
    const patched = applyJsonPatch(pod({ labels: { 'poolkeeper.dev/connection': 'orders-db' } }), result.patch) as { spec: { volumes: Array<{ name: string; secret?: { secretName: string; items: Array<{ key: string; path: string }> } }>; initContainers: Array<{ name: string; env: Array<{ name: string; value?: string }>; volumeMounts: Array<{ name: string; mountPath: string }> }>; containers: Array<{ name: string; volumeMounts?: Array<{ name: string }> }> } };
    const volume = patched.spec.volumes.find((v) => v.name === 'poolkeeper-db-ca');
    assert.deepEqual(volume?.secret?.secretName, 'db-ca');
    assert.deepEqual(volume?.secret?.items, [{ key: 'root.pem', path: 'ca.crt' }]);
    const sidecar = patched.spec.initContainers.find((x) => x.name === 'poolkeeper-sidecar')!;
    assert.ok(sidecar.volumeMounts.some((m) => m.name === 'poolkeeper-db-ca' && m.mountPath === '/var/run/poolkeeper/db-ca'));
    assert.equal(sidecar.env.find((e) => e.name === 'POOLKEEPER_DB_CA_FILE')?.value, '/var/run/poolkeeper/db-ca/ca.crt');
    assert.ok(patched.spec.containers.every((x) => !(x.volumeMounts ?? []).some((m) => m.name === 'poolkeeper-db-ca')), 'the app does not mount it');
  });

  it('warns when the pod matches no consumer but still injects', function () {
    const result = computeInjection({ pod: pod({ labels: { 'poolkeeper.dev/connection': 'orders-db' } }), connection: connection(), settings });
    assert.ok(result.patch.length > 0);
    assert.ok(result.warnings.some((w) => /no consumer/.test(w)));
    assert.equal(result.consumer, undefined);
  });
});

describe('inject: podNeedsRepair', function () {
  const now = new Date('2026-01-01T00:10:00Z');
  const old = (p: PodLike): PodLike => ({ ...p, metadata: { ...p.metadata, creationTimestamp: '2026-01-01T00:00:00Z' } });

  it('flags an opted-in pod without the sidecar older than the grace period', function () {
    assert.equal(podNeedsRepair(old(pod()), now, { gracePeriodSeconds: 60 }), true);
    assert.deepEqual(repairVerdict(old(pod()), now), { needsRepair: true, reason: 'MissingSidecar', recreatable: true });
  });

  it('leaves alone pods that are young, injected, terminating, finished, bare or not opted in', function () {
    assert.equal(repairVerdict(old(pod()), now, { gracePeriodSeconds: 3600 }).reason, 'TooYoung');
    assert.equal(repairVerdict(pod(), now).reason, 'TooYoung');
    assert.equal(repairVerdict(old(injected(pod())), now).reason, 'HasSidecar');
    const terminating = old(pod());
    terminating.metadata!.deletionTimestamp = '2026-01-01T00:09:00Z';
    assert.equal(repairVerdict(terminating, now).reason, 'Terminating');
    assert.equal(repairVerdict({ ...old(pod()), status: { phase: 'Succeeded' } }, now).reason, 'Finished');
    assert.equal(repairVerdict(old(pod({ labels: { app: 'x' } })), now).reason, 'NotOptedIn');
    assert.equal(repairVerdict(old(pod({ annotations: { 'poolkeeper.dev/inject': 'false' } })), now).reason, 'NotOptedIn');
    const bare = old(pod());
    delete bare.metadata!.ownerReferences;
    assert.deepEqual(repairVerdict(bare, now), { needsRepair: true, reason: 'MissingSidecar', recreatable: false });
  });
});

describe('inject: applyJsonPatch', function () {
  it('rejects adds under a missing parent and out-of-range indices, as the API server does', function () {
    assert.throws(() => applyJsonPatch({ a: {} }, [{ op: 'add', path: '/b/c', value: 1 }]), /does not exist/);
    assert.throws(() => applyJsonPatch({ a: [1] }, [{ op: 'add', path: '/a/3', value: 1 }]), /out of bounds/);
    assert.deepEqual(applyJsonPatch({ a: [1] }, [{ op: 'add', path: '/a/0', value: 0 }, { op: 'add', path: '/a/-', value: 2 }]), { a: [0, 1, 2] });
    assert.deepEqual(applyJsonPatch({ 'x/y': { '~': 1 } }, [{ op: 'replace', path: '/x~1y/~0', value: 2 }]), { 'x/y': { '~': 2 } });
  });
});
