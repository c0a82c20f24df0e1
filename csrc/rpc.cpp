#include "rpc.h"

#include <cerrno>
#include <cstring>

#include "errors.h"
#include "runtime.h"

#ifdef LLAMA_STEER_RPC
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ggml-rpc.h"
#endif

namespace llama_steer {

namespace {

// "host:port" -> (host, port); the host may be a name, an IPv4 address or a
// bracketed IPv6 address.
std::pair<std::string, std::string> split_endpoint(const std::string& endpoint) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) {
        throw InvalidArgument("RPC worker address must be host:port, got '" + endpoint + "'");
    }
    std::string host = endpoint.substr(0, colon);
    const std::string port = endpoint.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    char* end = nullptr;
    const long p = std::strtol(port.c_str(), &end, 10);
    if (*end != '\0' || p < 1 || p > 65535) {
        throw InvalidArgument("RPC worker port must be 1..65535, got '" + port + "' in '" + endpoint + "'");
    }
    return {host, port};
}

#ifdef LLAMA_STEER_RPC
// A TCP connect to endpoint within timeout_ms; "" when it succeeds, else why not.
std::string try_connect(const std::string& endpoint, int32_t timeout_ms) {
    const auto [host, port] = split_endpoint(endpoint);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const int gai = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
    if (gai != 0) return std::string("cannot resolve host: ") + gai_strerror(gai);
    std::string why = "no address";
    for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        const int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) {
            why = std::strerror(errno);
            continue;
        }
        int rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            pollfd pfd{fd, POLLOUT, 0};
            rc = poll(&pfd, 1, timeout_ms);
            if (rc == 0) {
                why = "no answer within " + std::to_string(timeout_ms) + " ms";
                rc = -1;
            } else if (rc > 0) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err != 0) why = std::strerror(err);
                rc = err == 0 ? 0 : -1;
            } else {
                why = std::strerror(errno);
            }
        } else if (rc != 0) {
            why = std::strerror(errno);
        }
        close(fd);
        if (rc == 0) {
            freeaddrinfo(res);
            return {};
        }
    }
    freeaddrinfo(res);
    return why;
}
#endif

}  // namespace

std::vector<ggml_backend_dev_t> local_gpus() {
    runtime_init();
    std::vector<ggml_backend_dev_t> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        const bool remote = std::strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
        if ((type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) && !remote) {
            out.push_back(dev);
        }
    }
    return out;
}

#ifdef LLAMA_STEER_RPC

bool rpc_available() { return true; }

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string>& endpoints, int32_t timeout_ms) {
    runtime_init();
    std::vector<ggml_backend_dev_t> devs;
    for (const std::string& ep : endpoints) {
        const std::string why = try_connect(ep, timeout_ms);
        if (!why.empty()) {
            throw ModelLoadError("cannot reach the RPC worker at " + ep + ": " + why +
                                 " (start one there with: llama-steer rpc-worker --host HOST --port PORT)");
        }
        const uint64_t lost = rpc_failures(ep);
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(ep.c_str());
        if (reg == nullptr || rpc_failures(ep) != lost) {
            throw ModelLoadError("the RPC worker at " + ep +
                                 " did not answer as a ggml RPC server of this version (protocol " +
                                 std::to_string(RPC_PROTO_MAJOR_VERSION) + "." +
                                 std::to_string(RPC_PROTO_MINOR_VERSION) + ") or has no devices");
        }
        for (size_t d = 0; d < ggml_backend_reg_dev_count(reg); ++d) devs.push_back(ggml_backend_reg_dev_get(reg, d));
    }
    return devs;
}

uint64_t rpc_failures(const std::string& endpoint) { return ggml_backend_rpc_failures(endpoint.c_str()); }

void rpc_serve(const std::string& endpoint, int32_t n_threads) {
    runtime_init();
    split_endpoint(endpoint);
    std::vector<ggml_backend_dev_t> devs = local_gpus();
    if (devs.empty()) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu == nullptr) throw Error("no CPU device to serve");
        devs.push_back(cpu);
    }
    if (n_threads < 1) throw InvalidArgument("n_threads must be positive");
    ggml_backend_rpc_start_server(endpoint.c_str(), nullptr, static_cast<size_t>(n_threads), devs.size(),
                                  devs.data());
    throw Error("the RPC server at " + endpoint + " stopped (is the address in use?)");
}

#else

bool rpc_available() { return false; }

std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string>& endpoints, int32_t) {
    if (!endpoints.empty()) {
        throw InvalidArgument("this build of llama-steer has no RPC backend (rebuild with -DLLAMA_STEER_RPC=ON)");
    }
    return {};
}

uint64_t rpc_failures(const std::string&) { return 0; }

void rpc_serve(const std::string&, int32_t) {
    throw InvalidArgument("this build of llama-steer has no RPC backend (rebuild with -DLLAMA_STEER_RPC=ON)");
}

#endif

}  // namespace llama_steer
