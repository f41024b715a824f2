# syntax=docker/dockerfile:1
# One image, three entry points: `poolkeeper controller`, `poolkeeper webhook`,
# `poolkeeper sidecar` (the webhook injects this same image as the sidecar).

# Build: compile TypeScript to JavaScript, then drop dev dependencies.
FROM node:24-bookworm-slim AS build
WORKDIR /src
# A C compiler for the sidecar's native socket I/O (Node-API: it loads in any Node.js 24).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY native ./native
COPY scripts/build-native.sh ./scripts/
RUN npx tsc -p tsconfig.build.json && bash scripts/build-native.sh && npm prune --omit=dev --no-audit --no-fund

# Run: distroless Node 24 (no shell, no package manager), non-root.
FROM gcr.io/distroless/nodejs24-debian12:nonroot
WORKDIR /app
ENV NODE_ENV=production
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY --from=build /src/build ./build
COPY package.json ./
# 65532 is distroless' nonroot user; the manifests and the injected sidecar run as it too.
USER 65532:65532
ENTRYPOINT ["/nodejs/bin/node", "/app/dist/bin/poolkeeper.js"]
CMD ["--help"]
