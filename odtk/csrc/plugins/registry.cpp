// Registers the odtk plugin creators so TensorRT finds them by name when it deserialises a plan.
#include "decode_plugin.h"
#include "nms_plugin.h"

namespace odtk {

namespace {

// Registers creator unless a creator of that name is there already (another copy of odtk in the process).
template <typename Plugin>
bool register_creator(nvinfer1::IPluginRegistry& registry, PluginCreator<Plugin>& creator) {
  return registry.getCreator(Plugin::kName, kPluginVersion, kPluginNamespace) != nullptr ||
         registry.registerCreator(creator, kPluginNamespace);
}

}  // namespace

bool register_plugins() {
  // function-local statics: created once, live as long as the process (TensorRT keeps pointers to them)
  static PluginCreator<DecodePlugin> decode_creator;
  static PluginCreator<NMSPlugin> nms_creator;
  static PluginCreator<DecodeRotatePlugin> decode_rotate_creator;
  static PluginCreator<NMSRotatePlugin> nms_rotate_creator;
  static const bool registered = [] {
    auto& registry = *getPluginRegistry();
    bool ok = register_creator(registry, decode_creator);
    ok = register_creator(registry, nms_creator) && ok;
    ok = register_creator(registry, decode_rotate_creator) && ok;
    return register_creator(registry, nms_rotate_creator) && ok;
  }();
  return registered;
}

}  // namespace odtk
